"""Command-line mistakes as our one-line error before Hydra starts a job.

Hydra reports an unknown key, an unknown group option or a value of the wrong
type in 7-28 lines, with exit code 1 and sometimes wrong advice ("To append to
your config use +trainer.epoch=5", which is then silently ignored). The entry
point calls :func:`preflight` first: it composes the command line's config
(every value of a discrete sweep once) with Hydra's compose API, turns Hydra's
errors into a :class:`trainer.config.ConfigError` whose hint names the nearest
valid name and lists the valid ones, and runs :func:`trainer.config.check_config`
so that a refused run creates no run directory.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from trainer.config import ConfigError, check_config, register
from trainer.config_keys import FREE_FORM, ROOT_GROUPS
from trainer.suggest import suggestion

__all__ = ["CONFIG_DIR", "compose_overrides", "override_variants", "preflight", "translate"]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PLAIN_FLAGS = ("-m", "--multirun")  # other flags (--cfg, -cn, --help, ...) leave the command line to Hydra


def compose_overrides(overrides: Sequence[str]) -> DictConfig:
    """``config.yaml`` composed with ``overrides`` (Hydra's compose API; Hydra's exceptions propagate)."""
    from hydra import compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name="trainer"):
        return compose(config_name="config", overrides=list(overrides))


def override_variants(overrides: Sequence[str]) -> List[List[str]]:
    """Override lists that together try every value of each discrete sweep once (intervals left out).

    Raises:
      ConfigError: an override Hydra's grammar cannot parse.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse the override: {str(err).strip().splitlines()[0]}",
                          "overrides are key=value, +key=value (a new key), ~key (remove) or group=option") from None
    choices = []
    for override in parsed:
        if not override.is_sweep_override():
            choices.append([override.input_line])
        elif override.is_discrete_sweep():
            choices.append([f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([])  # interval(...): a sweeper's search space, not a value
    base = [values[0] for values in choices if values]
    variants = [base]
    for index, values in enumerate(choices):
        for value in values[1:]:
            variant = [vals[0] for i, vals in enumerate(choices) if vals and i != index]
            variants.append(variant[:index] + [value] + variant[index:])
    return variants


def _without(overrides: Sequence[str], key: str) -> Optional[DictConfig]:
    kept = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
    try:
        return compose_overrides(kept)
    except Exception:  # noqa: BLE001 - only used to word the hint
        return None


def _group_options(group: str) -> List[str]:
    folder = os.path.join(CONFIG_DIR, group)
    return [name[:-5] for name in os.listdir(folder) if name.endswith(".yaml")] if os.path.isdir(folder) else []


def translate(error: Exception, overrides: Sequence[str]) -> ConfigError:
    """Hydra's composition error as a :class:`ConfigError` with a nearest-name hint."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigKeyError, ValidationError

    cause = error.__cause__ or error.__context__
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, name = str(error.missing_cfg_file).rpartition("/")
        options = sorted(error.options or _group_options(group))
        if group and options:
            return ConfigError(f"{group}={name}: there is no {group} option {name!r}",
                               suggestion(name, options, f"valid {group} options", prefix=f"{group}="))
    overridden = re.match(r"Could not override '([^']+)'", str(error))
    if overridden or (isinstance(cause, ConfigKeyError) and getattr(cause, "full_key", None)):
        full = overridden.group(1) if overridden else str(cause.full_key)
        parent, _, key = full.rpartition(".")
        node = _without(overrides, full)
        node = OmegaConf.select(node, parent) if node is not None and parent else node
        valid = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
        valid += [] if parent or not valid else list(ROOT_GROUPS)
        where = f"valid keys of {parent}" if parent else "valid top-level keys and groups"
        hint = suggestion(key, valid, where, prefix=f"{parent}." if parent else "") if valid else None
        if parent in FREE_FORM or parent.startswith("model"):  # open groups: a new key is added with `+`
            added = next((o for o in overrides if o.partition("=")[0] == full), f"{full}=...")
            hint = f"{hint}; or add a new key: +{added}" if hint else f"{parent} has no {key}; add it: +{added}"
        return ConfigError(f"{full} is not a config key", hint)
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        full = str(cause.full_key)
        value = next((o.partition("=")[2] for o in overrides if o.lstrip("+").partition("=")[0] == full), "")
        default = OmegaConf.select(_without(overrides, full) or OmegaConf.create(), full, default=None)
        reason = str(cause).strip().splitlines()[0]
        return ConfigError(f"{full}={value}: {reason}",
                           f"{full} takes a value like its default, {full}={default}" if default is not None else None)
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return ConfigError(" ".join(lines[:2]) if lines else type(error).__name__)


def preflight(args: Sequence[str]) -> None:
    """Composes and checks the command line's config(s) before Hydra creates a run directory.

    Args:
      args: ``sys.argv[1:]`` (``-m`` allowed; other flags skip the check and leave everything to Hydra).

    Raises:
      ConfigError: the first mistake, worded with a hint (see the module docstring), or a
        ``hydra.run.dir`` / ``hydra.sweep.dir`` that is an existing file.
    """
    if any(arg.startswith("-") and arg not in PLAIN_FLAGS for arg in args):
        return
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and os.path.exists(value) and not os.path.isdir(value):
            raise ConfigError(f"{key}={value!r} is a file, not a directory",
                              "pass a new directory, or the directory of a run to resume")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    for overrides in override_variants([arg for arg in args if arg not in PLAIN_FLAGS]):
        try:
            cfg = compose_overrides(overrides)
        except (HydraException, OmegaConfBaseException) as err:
            raise translate(err, overrides) from None
        check_config(cfg)
