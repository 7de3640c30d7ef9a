"""The run directory as a contract: a lock, a fingerprint of the trajectory, atomic writes, leftovers.

A run directory holds one run. :class:`RunLock` keeps a second process out
(``fcntl.flock`` on ``run.lock``, released by the kernel when the holder dies;
the file names the holder's PID for the message). :func:`check_fresh`
refuses to start a new run where an earlier run's files are.
:func:`fingerprint` flattens every config key that decides the training
trajectory; :func:`config_changes` compares it with the one a checkpoint
stores, so ``resume=`` refuses a changed config before anything is written.
Every file is written through :func:`atomic_write` (a temporary
``.tmp-<pid>-<name>`` beside it, then ``os.replace``), and
:func:`clean_leftovers` removes the temporaries a killed process left.
:func:`write_records` writes what describes a run once every check passed
(``.hydra/``, ``fingerprint.json``, ``freeze_plan.json``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

__all__ = ["ALLOW_KEY", "CHANGEABLE_KEYS", "FINGERPRINT_NAME", "LENGTH_KEYS", "OUTPUT_NAMES", "RUN_MARKERS",
           "TRAJECTORY_KEYS", "RunDirError", "RunLock", "atomic_write", "change_allowed", "check_changes",
           "check_fresh", "checkpoint_steps", "clean_leftovers", "config_changes", "fingerprint", "has_checkpoints",
           "hydra_config", "write_json", "write_records", "write_text"]

log = logging.getLogger("trainer")

LOCK_NAME = "run.lock"
TMP_PREFIX = ".tmp-"
FINGERPRINT_NAME = "fingerprint.json"
# What a run writes into its directory (a fresh run refuses to replace any of them).
OUTPUT_NAMES = ("checkpoints", "tb", "report.json", "weights.npz", "sparse_weights.npz", "masks.npz", "model.keras",
                "saved_model", "freeze_plan.json", "best_weights.npz", FINGERPRINT_NAME, ".hydra")
CKPT_INDEX = re.compile(r"ckpt-(\d+)\.index")
# Config keys that decide the trajectory. The run length may grow on resume (see :func:`config_changes`).
TRAJECTORY_KEYS = ("seed", "data", "model", "optimizer", "freeze", "sft", "trainer.batch_size",
                   "trainer.steps_per_execution", "trainer.jit_compile", "trainer.deterministic",
                   "trainer.nan_policy", "trainer.mixed_precision", "distribute")
LENGTH_KEYS = ("trainer.epochs", "trainer.max_steps")
ALLOW_KEY = "resume_allow_changes"
# The keys resume_allow_changes may name: the checkpoint's state does not depend on them (:mod:`trainer.resume`).
CHANGEABLE_KEYS = LENGTH_KEYS + ("trainer.batch_size", "trainer.steps_per_execution", "trainer.jit_compile",
                                 "trainer.deterministic", "trainer.nan_policy")


class RunDirError(ValueError):
    """The run directory cannot hold this run (in use, another run's files, a changed config)."""


# ------------------------------------------------------------------ atomic writes
@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary keeps ``path``'s suffix (``np.savez`` and ``model.save``
    look at it). On an exception it is removed and ``path`` is untouched.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, data: Any) -> None:
    """Writes ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


# The temporaries this package and TensorFlow's checkpointing write, by exact name (see :func:`clean_leftovers`).
_OWN_TEMPORARY = re.compile(r"\.tmp-\d+-(?:%s)(?:\.old)?" % "|".join(map(re.escape, OUTPUT_NAMES)))
_HYDRA_TEMPORARY = re.compile(r"\.tmp-\d+-(?:config|hydra|overrides)\.yaml")
_CKPT_TEMPORARY = re.compile(r"\.tmp-\d+-checkpoint|ckpt-\d+_temp|checkpoint\.tmp[0-9a-f]+")
RUN_MARKERS = ("report.json", FINGERPRINT_NAME, LOCK_NAME)  # a directory holding one holds a run of its own


def _run_inside(path: str) -> Optional[str]:
    """The first file of :data:`RUN_MARKERS` found at any depth under the directory ``path`` (``None``: none)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return None
    for root, _, files in os.walk(path):
        for name in files:
            if name in RUN_MARKERS:
                return os.path.relpath(os.path.join(root, name), path)
    return None


def clean_leftovers(run_dir: str) -> List[str]:
    """Removes the temporaries a killed run left, by the exact names this project writes; returns their paths.

    Only ``.tmp-<pid>-<name>`` in ``run_dir`` with ``<name>`` one of :data:`OUTPUT_NAMES`
    (:func:`atomic_write`'s temporaries, ``saved_model``'s ``.old`` too), the same for the files of
    ``.hydra/``, and in ``checkpoints/`` our ``.tmp-<pid>-checkpoint``, TensorFlow's ``ckpt-<step>_temp``
    (a cut save) and ``checkpoint.tmp<hex>`` (a cut index update). Any other name (``.tmp-notes``) stays,
    and so does a directory holding a run of its own (one of :data:`RUN_MARKERS` at any depth): a warning
    names it. What is removed is logged in one line. Call it with the lock held.

    Returns:
      The removed paths, relative to ``run_dir``, sorted by directory.
    """
    removed = []
    places = ((run_dir, _OWN_TEMPORARY), (os.path.join(run_dir, ".hydra"), _HYDRA_TEMPORARY),
              (os.path.join(run_dir, "checkpoints"), _CKPT_TEMPORARY))
    for directory, pattern in places:
        if not os.path.isdir(directory) or os.path.islink(directory):
            continue
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if pattern.fullmatch(name) is None:
                continue
            marker = _run_inside(path)
            if marker is not None:
                log.warning("kept %s: it is named like a temporary of this project but holds a run of its own (%s)",
                            os.path.relpath(path, run_dir), marker)
                continue
            _remove(path)
            removed.append(os.path.relpath(path, run_dir))
    if removed:
        log.info("removed leftovers of an interrupted write: %s", ", ".join(removed))
    return removed


# ------------------------------------------------------------------ lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory, held from :meth:`acquire` to :meth:`release`.

    ``fcntl.flock`` on ``<run_dir>/run.lock`` is the lock (the kernel drops
    it when the holder dies, even by SIGKILL); the file holds the holder's
    PID, so a refusal names it and a lock file left by a dead process is
    reported as stale and taken over.

    Args:
      run_dir: the run directory (it must exist).
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Takes the lock.

        Raises:
          RunDirError: another live process holds it (naming its PID).
        """
        while True:
            existed = os.path.exists(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise RunDirError(f"run directory {self.run_dir} is in use by process {holder} (lock "
                                  f"{self.path}); wait for it to end, or start this run in another "
                                  "hydra.run.dir") from None
            # The holder may have released and unlinked the file between our open and flock: retry.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if existed:
            stale = os.read(fd, 64).decode("ascii", "replace").strip()
            if stale.isdigit() and not _alive(int(stale)):
                log.warning("took over the stale lock of process %s, which is no longer running", stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Removes the lock file and releases the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------ what the directory holds
def checkpoint_steps(run_dir: str) -> List[int]:
    """The steps of the ``checkpoints/ckpt-<step>.index`` files in ``run_dir`` (ascending).

    The ``checkpoint`` index file is not read: it may be missing, cut or
    crafted; only regular files named exactly ``ckpt-<digits>.index`` count.
    """
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    steps = []
    for name in os.listdir(ckpt_dir):
        match = CKPT_INDEX.fullmatch(name)
        if match and os.path.isfile(os.path.join(ckpt_dir, name)) and not os.path.islink(os.path.join(ckpt_dir, name)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def has_checkpoints(run_dir: str) -> bool:
    """True when ``run_dir/checkpoints`` holds at least one ``ckpt-<step>.index`` file."""
    return bool(checkpoint_steps(run_dir))


def check_fresh(run_dir: str) -> None:
    """Refuses a new run in a directory that holds an earlier run's files.

    Raises:
      RunDirError: checkpoints are there (continue with ``resume=``), or files
        a run writes (``report.json``, ``weights.npz``, ...) would be replaced.
    """
    if has_checkpoints(run_dir) or os.path.exists(os.path.join(run_dir, "checkpoints", "checkpoint")):
        raise RunDirError(f"{run_dir} holds the checkpoints of an earlier run: continue it with "
                          f"resume={run_dir}, or start a new run in another hydra.run.dir")
    present = [n for n in OUTPUT_NAMES if os.path.lexists(os.path.join(run_dir, n))]
    if present:
        raise RunDirError(f"{run_dir} already holds {', '.join(present)}: a new run would replace them; "
                          "pick a new or empty hydra.run.dir")


def hydra_config() -> Optional[DictConfig]:
    """The running Hydra job's ``hydra`` config (``runtime.output_dir``, ``overrides.task``); ``None`` outside."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def write_records(run_dir: str, config: DictConfig, plan: List[Dict[str, Any]],
                  fingerprint: Optional[Dict[str, Any]], *, resume: bool) -> None:
    """Writes what describes the run, after every check passed: ``.hydra/``, ``fingerprint.json``, ``freeze_plan.json``.

    Hydra's own ``.hydra/`` writing is off (``hydra.output_subdir: null``) so
    that a refused run changes nothing; these are the same files, written
    here, when ``run_dir`` is the Hydra job's output directory. A resumed run
    keeps ``.hydra/overrides.yaml`` (how the run was started); its config and
    the plan are those of the run as it continues. Every file is written
    atomically.

    Args:
      run_dir: the run directory (its lock held).
      config: the composed config, written as ``.hydra/config.yaml``.
      plan: the freeze plan, one dict per variable
        (:meth:`trainer.masks.MaskRegistry.plan`), written as ``freeze_plan.json``.
      fingerprint: :func:`fingerprint` of the config, or ``None`` (a dry run:
        no ``fingerprint.json``).
      resume: the run continues an earlier one.
    """
    hydra_cfg = hydra_config()
    if hydra_cfg is not None and os.path.abspath(hydra_cfg.runtime.output_dir) == os.path.abspath(run_dir):
        hydra_dir = os.path.join(run_dir, ".hydra")
        os.makedirs(hydra_dir, exist_ok=True)
        write_text(os.path.join(hydra_dir, "config.yaml"), OmegaConf.to_yaml(config))
        write_text(os.path.join(hydra_dir, "hydra.yaml"), OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
        if not resume or not os.path.exists(os.path.join(hydra_dir, "overrides.yaml")):
            write_text(os.path.join(hydra_dir, "overrides.yaml"),
                       OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))))
    if fingerprint is not None:
        write_json(os.path.join(run_dir, FINGERPRINT_NAME), fingerprint)
    write_json(os.path.join(run_dir, "freeze_plan.json"), {"variables": plan})


# ------------------------------------------------------------------ fingerprint
def _flatten(value: Any, prefix: str, out: Dict[str, Any]) -> None:
    if isinstance(value, dict):
        if not value:
            out[prefix] = {}
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, (list, tuple)):
        if not value:
            out[prefix] = []
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}.{i}", out)
    else:
        out[prefix] = value


def fingerprint(config: Dict[str, Any]) -> Dict[str, Any]:
    """The keys of a resolved config (a plain dict) that decide the trajectory, flattened.

    Returns:
      ``{"seed": 0, "freeze.rules.sparse.elements.random": 0.9, ...,
      "trainer.epochs": 10, "trainer.max_steps": None}``: every leaf under
      :data:`TRAJECTORY_KEYS` and :data:`LENGTH_KEYS`, keyed by dotted path.
    """
    out: Dict[str, Any] = {}
    for key in TRAJECTORY_KEYS + LENGTH_KEYS:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        _flatten(node, key, out)
    return json.loads(json.dumps(out, default=str))  # what JSON stores: tuples as lists, keys as strings


def _length_grows(old: Any, new: Any) -> bool:
    def steps(value):
        return float("inf") if value is None else value

    return isinstance(new, (int, type(None))) and isinstance(old, (int, type(None))) and steps(new) >= steps(old)


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """The ``(key, old, new)`` differences of two fingerprints that change the trajectory.

    ``trainer.epochs`` / ``trainer.max_steps`` may grow (``null`` = no cap),
    except under ``optimizer.schedule: cosine``, whose decay length they set.
    A key present on one side only is reported with ``"(absent)"``.
    """
    cosine = new.get("optimizer.schedule") == "cosine"
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if a == b and isinstance(a, bool) == isinstance(b, bool):
            continue
        if key in LENGTH_KEYS and not cosine and _length_grows(a, b):
            continue
        changes.append((key, a, b))
    return changes


def change_allowed(key: str, allowed: Sequence[str]) -> bool:
    """True when ``allowed`` (``resume_allow_changes``) names ``key``, or has ``"*"`` and ``key`` can change."""
    return any((a == "*" and key in CHANGEABLE_KEYS) or key == a or key.startswith(a + ".") for a in allowed)


def check_changes(run_dir: str, old: Dict[str, Any], new: Dict[str, Any],
                  allowed: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Refuses a resume whose config changes the trajectory, unless each change is allowed.

    Args:
      run_dir: the run being resumed (named in the message).
      old: the fingerprint stored with the run's checkpoint.
      new: this config's fingerprint.
      allowed: keys (or key prefixes, or ``"*"``) given in ``resume_allow_changes``.

    Returns:
      The accepted changes as ``[{"key", "old", "new"}]`` (recorded in the report).

    Raises:
      RunDirError: one line listing each refused key as ``key: old -> new``
        and how to start a new run or allow the change.
    """
    changes = config_changes(old, new)
    refused = [c for c in changes if not change_allowed(c[0], allowed)]
    if refused:
        listed = "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in refused)
        keys = ",".join(k for k, _, _ in refused)
        raise RunDirError(f"resume={run_dir} was trained with another config ({listed}); start a new run "
                          f"without resume= (or in another hydra.run.dir), or continue with the changed values "
                          f"by adding '{ALLOW_KEY}=[{keys}]'")
    return [{"key": k, "old": a, "new": b} for k, a, b in changes]
