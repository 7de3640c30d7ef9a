"""``resume=<run dir>`` and ``resume=true``: find the run directory to continue in place.

Hydra picks the run directory before the job starts, so the entry point
resolves ``resume`` from the command line first and passes
``hydra.run.dir=<that directory>`` on to Hydra. When the run starts,
:func:`check_resumable` checks the directory's newest readable checkpoint
against the config, before anything is written.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from trainer.data_digest import comparable
from trainer.rundir import (ALLOW_KEY, CHANGEABLE_KEYS, RunDirError, change_allowed, check_changes, checkpoint_steps,
                            config_changes, fingerprint, has_checkpoints)

__all__ = ["FIXED_KEYS", "ResumeError", "check_allowed", "check_resumable", "compose_fingerprint", "has_checkpoint",
           "latest_run", "nothing_to_resume", "resolve_resume"]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TRUE = ("true", "True", "yes", "1")


class ResumeError(ValueError):
    """The run to resume does not exist, holds no checkpoint, or no run matches this config."""


def has_checkpoint(run_dir: str) -> bool:
    """True when ``run_dir/checkpoints`` holds a ``ckpt-<step>.index`` file (the index file may be gone)."""
    return has_checkpoints(run_dir)


def nothing_to_resume(run_dir: str) -> ResumeError:
    """The error for a resumed run directory without a ``checkpoints/ckpt-*.index`` file (returned, for ``raise``)."""
    return ResumeError(f"resume: {run_dir!r} has no checkpoints/ckpt-*.index to continue from")


# Why each other key cannot change on resume: what the checkpoint holds that was made with the old value.
FIXED_KEYS = {
    "seed": "the digits split, the data order and the rules' random draws come from it, and the checkpoint holds "
            "the masks drawn with the old seed",
    "data": "the checkpoint's position in the data (batches drawn) and the data digest belong to the old data",
    "model": "the checkpoint holds the old model's variables, by path and shape",
    "freeze": "the checkpoint holds the old rules' masks, pinned values and compact slots",
    "sft": "the checkpoint holds the masks of the old selection",
    "optimizer": "the checkpoint holds the old optimizer's slots, step and learning rate",
    "trainer.mixed_precision": "it changes the optimizer (a loss-scale wrapper) whose state the checkpoint holds",
    "distribute": "it changes how each step's batch and gradients are split across replicas",
}


def check_allowed(allowed: Sequence[str]) -> List[str]:
    """Refuses ``resume_allow_changes`` entries that name keys which cannot change, before anything is read.

    Each entry must be ``"*"`` (every key of
    :data:`~trainer.rundir.CHANGEABLE_KEYS`) or one of those keys; the run
    length, batch size, steps per execution, XLA, determinism and NaN policy
    act from the restored step on. Every other key decides something the
    checkpoint holds (:data:`FIXED_KEYS` says what), so a resume with it
    changed could not restore or would restore a state the new value did
    not make.

    Args:
      allowed: the ``resume_allow_changes`` entries.

    Returns:
      ``allowed`` as a list of strings.

    Raises:
      RunDirError: one line naming each refused entry with its reason and
        listing the keys that can change.
    """
    allowed = [str(a) for a in allowed]
    refused = []
    for entry in allowed:
        if entry == "*" or entry in CHANGEABLE_KEYS:
            continue
        reason = next((why for key, why in FIXED_KEYS.items()
                       if entry == key or entry.startswith(key + ".") or key.startswith(entry + ".")),
                      "it is not a key of the run's fingerprint")
        refused.append(f"{entry} ({reason})")
    if refused:
        raise RunDirError(f"{ALLOW_KEY} names keys that cannot change on resume: {'; '.join(refused)}. The keys "
                          f"that can change are {', '.join(CHANGEABLE_KEYS)} ('*' allows all of them); for any "
                          "other change start a new run without resume=")
    return allowed


def check_resumable(run_dir: str, new: Dict[str, Any], allowed: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """The checks before a resumed run writes into ``run_dir`` (call it with the run lock held).

    The newest checkpoint that reads back whole must store a fingerprint
    that matches ``new`` (up to a longer run, or changes ``allowed``:
    :func:`trainer.rundir.check_changes`).

    Args:
      run_dir: the run being resumed.
      new: this config's :func:`trainer.rundir.fingerprint`.
      allowed: keys (or key prefixes, or ``"*"``) of ``resume_allow_changes``.

    Returns:
      The accepted config changes, as ``[{"key", "old", "new"}]``.

    Raises:
      ResumeError: no checkpoint to continue from.
      CheckpointError: checkpoints exist but none reads back whole.
      RunDirError: an ``allowed`` key that cannot change (:func:`check_allowed`,
        before the checkpoint is read), no fingerprint in the checkpoint, or
        the config changed.
    """
    from trainer.checkpoint import CheckpointError, latest_good

    allowed = check_allowed(allowed)
    path, record, bad = latest_good(run_dir)
    if path is None:
        if bad:
            raise CheckpointError(f"no readable checkpoint in {os.path.join(run_dir, 'checkpoints')}: "
                                  + "; ".join(f"{p} ({e})" for p, e in bad))
        raise nothing_to_resume(run_dir)
    if not record or "fingerprint" not in record:
        raise RunDirError(f"resume={run_dir}: checkpoint {path} stores no config fingerprint, so the config cannot "
                          "be checked; start a new run without resume=")
    return check_changes(run_dir, *comparable(record["fingerprint"], new), allowed)


def _override(argv: List[str], key: str) -> Optional[str]:
    for arg in argv:
        for prefix in (f"{key}=", f"+{key}=", f"++{key}="):
            if arg.startswith(prefix):
                return arg[len(prefix):]
    return None


def compose_fingerprint(argv: List[str]) -> Dict[str, Any]:
    """The fingerprint of the config that ``argv`` (Hydra overrides) composes, without starting a run.

    Flags (``-m``, ``--cfg``) and ``hydra.*`` / ``resume`` overrides are left out.

    Raises:
      ResumeError: the overrides do not compose (one line with Hydra's reason).
    """
    from hydra import compose, initialize_config_dir

    from trainer.config import register

    register()
    overrides = [a for a in argv if not a.startswith("-")
                 and a.lstrip("+~").split("=", 1)[0].split(".")[0] not in ("hydra", "resume")]
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        return fingerprint(OmegaConf.to_container(cfg, resolve=True))
    except Exception as err:  # noqa: BLE001 - Hydra and OmegaConf raise several kinds for a bad override
        raise ResumeError(f"resume=true: the command's config does not compose: "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def latest_run(outputs_root: str, name: str, argv: Sequence[str] = ()) -> str:
    """The newest run of experiment ``name`` under ``outputs_root`` whose checkpoint has this config.

    "This config" is what ``argv`` composes; a run matches when
    :func:`trainer.rundir.config_changes` finds no difference with the
    fingerprint stored in its newest readable checkpoint (a longer run is
    allowed), or only keys listed in ``resume_allow_changes``.

    Raises:
      ResumeError: no run with a checkpoint, or none with this config (one
        line naming the newest run's differences and what to pass instead).
    """
    from trainer.checkpoint import latest_good

    base = os.path.join(outputs_root, name)
    runs = [os.path.join(base, d) for d in os.listdir(base)] if os.path.isdir(base) else []
    runs = sorted((r for r in runs if has_checkpoint(r)), key=lambda r: max(
        os.path.getmtime(os.path.join(r, "checkpoints", f"ckpt-{s}.index")) for s in checkpoint_steps(r)), reverse=True)
    if not runs:
        raise ResumeError(f"resume=true: no run with a checkpoint under {base!r}; "
                          "pass resume=<run dir> or start a new run without resume")
    wanted = compose_fingerprint(list(argv))
    allowed = check_allowed(_list_override(_override(list(argv), ALLOW_KEY)))
    differences = []
    for run_dir in runs:
        _, record, _ = latest_good(run_dir)
        stored = (record or {}).get("fingerprint")
        changes = (config_changes(*comparable(stored, wanted)) if stored is not None
                   else [("fingerprint", "(none)", "(this config)")])
        changes = [c for c in changes if not change_allowed(c[0], allowed)]
        if not changes:
            return run_dir
        differences.append((run_dir, changes))
    newest, changes = differences[0]
    listed = "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in changes[:5])
    raise ResumeError(f"resume=true: none of the {len(runs)} runs under {base!r} has this config (the newest, "
                      f"{newest}, differs in {listed}); pass resume=<run dir> to continue a run with its own "
                      "config, or drop resume= to start a new run")


def _list_override(text: Optional[str]) -> List[str]:
    if not text:
        return []
    return [p.strip().strip("'\"") for p in text.strip().strip("[]").split(",") if p.strip()]


def resolve_resume(argv: List[str], outputs_root: str = "outputs") -> List[str]:
    """Returns ``argv`` with ``hydra.run.dir`` set to the run that ``resume=`` names.

    ``resume=true`` takes the latest run of the experiment (``name=`` or
    ``+experiment=`` on the command line, else ``default``) whose stored
    config fingerprint matches this command's config; ``resume=<dir>`` takes
    that directory (its config is checked when the run starts); no
    ``resume`` (or ``resume=null``) changes nothing.

    Raises:
      ResumeError: the directory is missing or has no checkpoint, or no run
        of the experiment has this config.
    """
    value = _override(argv, "resume")
    if value in (None, "", "null", "None", "false", "False"):
        return argv
    if value in TRUE:
        name = _override(argv, "name") or _override(argv, "experiment") or "default"
        run_dir = latest_run(outputs_root, name, argv)
    else:
        run_dir = os.path.expanduser(value)
        if not os.path.isdir(run_dir):
            raise ResumeError(f"resume={value!r} is not a directory; pass the run directory of an earlier run")
        if not has_checkpoint(run_dir):
            raise ResumeError(f"resume={value!r} has no checkpoints/ckpt-*.index to continue from")
    run_dir = os.path.abspath(run_dir)
    argv = [a for a in argv if not a.startswith(("hydra.run.dir=", "+resume=", "++resume=", "resume="))]
    return argv + [f"resume={run_dir}", f"hydra.run.dir={run_dir}"]
