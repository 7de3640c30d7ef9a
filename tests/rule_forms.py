"""One freeze rule written three ways: Python keywords, a YAML config file, and command-line overrides.

The selector, value and schedule tests run every case through all three, so a
rule means the same wherever a user writes it.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONFIGS
from trainer.config import register
from trainer.masks import MaskRegistry, rules_from_config
from trainer.run import build_registry

register()

FORMS = ("python", "yaml", "cli")


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar, e.g. ``{select:'fc/kernel',elements:{indices:[0,5]}}``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    raise TypeError(f"no override syntax for {value!r}")


def cli_overrides(rules: Dict[str, Dict[str, Any]]) -> List[str]:
    """``+freeze.rules.<name>=<rule>`` overrides, as typed after ``python -m trainer``."""
    return [f"+freeze.rules.{name}={hydra_value(rule)}" for name, rule in rules.items()]


def composed_rules(overrides: List[str]) -> Dict[str, Any]:
    """``freeze.rules`` of the project's config composed with ``overrides`` (as plain containers)."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg.freeze.rules, resolve=True)


_COMPOSED: Dict[str, Any] = {}


def _key(rule: Dict[str, Any]) -> str:
    return json.dumps(rule, sort_keys=True)


def precompose(rules: List[Dict[str, Any]]) -> None:
    """Composes many rules as overrides in one Hydra composition (much faster than one each).

    ``registry_from("cli", ...)`` then reuses each rule as Hydra parsed it.
    """
    todo = {_key(r): r for r in rules if _key(r) not in _COMPOSED}
    if todo:
        names = {f"case{i}": key for i, key in enumerate(todo)}
        composed = composed_rules(cli_overrides({n: todo[k] for n, k in names.items()}))
        _COMPOSED.update({key: composed[name] for name, key in names.items()})


def registry_from(form: str, model, rules: Dict[str, Dict[str, Any]], registry: MaskRegistry = None) -> MaskRegistry:
    """A registry of ``model`` with ``rules`` (``{name: rule keywords}``) added in the given form.

    ``python``: ``registry.freeze(name=name, **rule)``; ``yaml``: the rules
    dumped to YAML text and loaded by OmegaConf, as a config file is; ``cli``:
    the rules as ``+freeze.rules.<name>=...`` overrides composed by Hydra. The
    config forms go through ``trainer.run.build_registry`` (what ``run`` does),
    or, given an existing ``registry``, through ``rules_from_config`` into it.
    """
    if form == "python":
        registry = registry if registry is not None else MaskRegistry(model)
        for name, rule in rules.items():
            registry.freeze(name=name, **json.loads(json.dumps(rule)))
        return registry
    if form == "yaml":
        text = yaml.safe_dump({"freeze": {"rules": rules}}, default_flow_style=False)
        config = OmegaConf.to_container(OmegaConf.create(text).freeze.rules, resolve=True)
    elif form == "cli":
        if all(_key(r) in _COMPOSED for r in rules.values()):
            config = {name: _COMPOSED[_key(r)] for name, r in rules.items()}
        else:
            config = composed_rules(cli_overrides(rules))
    else:
        raise ValueError(form)
    if registry is None:
        return build_registry(model, config)
    for rule in rules_from_config(config):
        registry.add_rule(rule)
    return registry
