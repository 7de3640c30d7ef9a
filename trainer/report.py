"""The end-of-run audit, ``report.json``, the run record across resumes, and exports (``model.keras``, ``masks.npz``)."""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import numpy as np

from trainer import rundir
from trainer.callbacks import Callback
from trainer.masks import audit as masks_audit
from trainer.sft import trainable_elements
from trainer.lite_export import export_tflite
from trainer.sparse_export import write_sparse_weights
from trainer.stripping import strip_for_export
from trainer.writes import WriteError, failure_text, writing

__all__ = ["RunRecord", "audit", "audit_line", "early_stopping_summary", "export_masks", "export_model",
           "export_saved_model", "export_sparse_weights", "export_weights", "run_report", "totals", "write_json",
           "write_run_files"]

log = logging.getLogger("trainer")


def audit(registry) -> List[Dict[str, Any]]:
    """Per trainable variable: path, shape, frozen_elements, sparsity (exact zeros), drift (and ``precision``).

    ``drift`` is the max |value - pinned| over frozen elements (0.0 expected)
    and ``exact`` whether every frozen element is bit-for-bit its pinned value.
    The statistics are :func:`trainer.masks.audit.variable_rows`, shared with the summaries.
    """
    keys = ("path", "shape", "frozen_elements", "frozen_fraction", "sparsity", "drift", "rules")
    return [{k: row[k] for k in keys + ("precision",) if k in row} for row in masks_audit.variable_rows(registry)]


def audit_line(rows: List[Dict[str, Any]], exact: bool) -> str:
    """``"266,200 frozen elements in 3 variables, all bit-exact"``."""
    frozen = sum(r["frozen_elements"] for r in rows)
    n = sum(1 for r in rows if r["frozen_elements"])
    state = "all bit-exact" if exact else "NOT exact: see drift in report.json"
    return f"{frozen:,} frozen element{'' if frozen == 1 else 's'} in {n} variable{'' if n == 1 else 's'}, {state}"


def write_json(path: str, data: Dict[str, Any]) -> None:
    """Writes JSON atomically (a temporary file beside it, then ``os.replace``)."""
    rundir.write_json(path, data)


def export_masks(registry, path: str) -> None:
    """Writes ``masks.npz``: each trainable variable's bool trainable-mask under its variable path."""
    with rundir.atomic_write(path) as tmp:
        np.savez(tmp, **registry.trainable_masks())


def export_weights(model, path: str) -> None:
    """Writes ``weights.npz``: every variable's value (NumPy, the variable's dtype and shape) under its variable path.

    The file loads back with ``model.init_from`` (:func:`trainer.pretrained.load_initial_weights`);
    it is written atomically.

    Args:
      model: a built Keras model.
      path: the ``.npz`` file to write (replaced whole).
    """
    with rundir.atomic_write(path) as tmp:
        np.savez(tmp, **{v.path: np.asarray(v.numpy()) for v in model.variables})


def export_sparse_weights(model, registry, path: str) -> Dict[str, int]:
    """Writes ``sparse_weights.npz``: covered variables as COO indices and values, the rest dense.

    Returns its sizes (:func:`trainer.sparse_export.write_sparse_weights`).
    """
    weights = {v.path: np.asarray(v.numpy()) for v in model.variables}
    with rundir.atomic_write(path) as tmp:
        return write_sparse_weights(weights, registry.covered_paths(), tmp)


def export_model(model, path: str) -> None:
    """Saves ``model.keras`` (a plain Keras model; loading it needs no import of this package)."""
    with rundir.atomic_write(path) as tmp:
        model.save(tmp)


def export_saved_model(model, directory: str) -> None:
    """Writes a TensorFlow SavedModel with a ``serving_default`` signature (replacing an earlier one whole)."""
    aside = None
    with rundir.atomic_write(directory) as tmp:
        model.export(tmp, format="tf_saved_model")
        if os.path.isdir(directory):  # os.replace cannot replace a non-empty directory: move it aside first
            aside = tmp + ".old"
            os.replace(directory, aside)
    if aside is not None:
        shutil.rmtree(aside)


class RunRecord(Callback):
    """The run's history across resumes: its fingerprint, every epoch's logs and one row per segment.

    A segment is one process's part of the run (a fresh start or a resume).
    The record is stored in every checkpoint (see
    :class:`~trainer.checkpoint.Checkpointing`'s ``record``) and read back on
    resume with :meth:`restore`, so ``report.json`` keeps the whole history,
    sums wall time and lists the segments even after a SIGKILL. Place it
    before the checkpointing callback (it must see each epoch first).

    Args:
      fingerprint: this config's :func:`trainer.rundir.fingerprint`.
      config_changes: changes accepted with ``resume_allow_changes`` for this
        segment, as ``[{"key", "old", "new"}]``.
    """

    def __init__(self, *, fingerprint: Dict[str, Any], config_changes: List[Dict[str, Any]] = ()):
        self.fingerprint = fingerprint
        self.config_changes = list(config_changes)
        self.previous_history: List[Dict[str, Any]] = []
        self.previous_segments: List[Dict[str, Any]] = []
        self.history: List[Dict[str, Any]] = []
        self.started = time.perf_counter()
        self.start_step = 0
        self.start_examples = 0
        self.fit_started: Optional[float] = None

    def restore(self, record: Dict[str, Any]) -> None:
        """Takes the history and segments of a record read back from a checkpoint.

        A segment stored while ``"running"`` ended without finishing (a kill):
        it is listed as ``"killed"``.
        """
        self.previous_history = list(record.get("history", []))
        self.previous_segments = [dict(s, status="killed" if s.get("status") == "running" else s.get("status"))
                                  for s in record.get("segments", [])]

    def on_train_begin(self, state) -> None:
        self.start_step = state.step
        self.start_examples = state.examples
        self.fit_started = time.perf_counter()

    def on_epoch_end(self, state, epoch: int, step: int, logs: Dict[str, Any]) -> None:
        self.history.append(dict(logs))

    def segment(self, state, status: str) -> Dict[str, Any]:
        """This process's row: steps from/to, wall and training seconds, examples, status, accepted changes."""
        now = time.perf_counter()
        train_seconds = state.timing.get("train_seconds") if status != "running" else None
        if train_seconds is None:
            train_seconds = now - self.fit_started if self.fit_started is not None else 0.0
        return {"start_step": self.start_step, "end_step": state.step, "status": status,
                "wall_seconds": now - self.started, "train_seconds": train_seconds,
                "examples": state.examples - self.start_examples,
                "config_changes": self.config_changes}

    def snapshot(self, state, status: str = "running") -> Dict[str, Any]:
        """The whole record (fingerprint, history, segments with this one last) as a JSON-able dict."""
        return {"fingerprint": self.fingerprint, "history": self.previous_history + self.history,
                "segments": self.previous_segments + [self.segment(state, status)]}


def totals(segments: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Wall seconds summed over segments and examples per second over the segments that trained."""
    trained = [s for s in segments if s["examples"] > 0]
    seconds = sum(s["train_seconds"] for s in trained)
    return {"wall_seconds": sum(s["wall_seconds"] for s in segments),
            "examples_per_second": sum(s["examples"] for s in trained) / seconds if seconds > 0 else None}


def early_stopping_summary(history: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The epoch of lowest validation loss and the test metrics there (Frankle & Carbin 2019's protocol).

    Args:
      history: one logs dict per epoch (floats keyed ``val_loss``,
        ``test_accuracy``, ...), epoch 1 first.

    Returns:
      ``{"epoch", "val_loss", "val_accuracy", "test_loss", "test_accuracy"}``
      of that epoch (``epoch`` from 1), or ``None`` when no epoch has both
      ``val_loss`` and ``test_accuracy`` (``log.test_every_epoch`` off).
    """
    rows = [(i, h) for i, h in enumerate(history, 1) if "val_loss" in h and "test_accuracy" in h]
    if not rows:
        return None
    epoch, best = min(rows, key=lambda r: r[1]["val_loss"])
    return {"epoch": epoch, "val_loss": best["val_loss"], "val_accuracy": best.get("val_accuracy"),
            "test_loss": best["test_loss"], "test_accuracy": best["test_accuracy"]}


def run_report(state, record: RunRecord, *, status: str, test: Dict[str, Any],
               error: Optional[str] = None) -> Dict[str, Any]:
    """The ``report.json`` dict of a run that has ended: test metrics, timing, the audit, history and segments.

    ``history``, ``segments``, ``wall_seconds`` and ``examples_per_second``
    cover the whole run, earlier segments (before a resume) included;
    ``config_changes`` lists every change accepted with ``resume_allow_changes``.

    Args:
      state: the trainer's :class:`~trainer.controller.LoopState` now (its
        step, timing and registry are read).
      record: the run's :class:`RunRecord` (its snapshot closes this segment
        with ``status``).
      status: ``"completed"``, ``"interrupted"`` or ``"failed"``.
      test: the test metrics (floats by name; ``{"loss": None}`` when not evaluated).
      error: ``"<ExceptionType>: <message>"`` of a failed run, added as ``error``.

    Returns:
      A JSON-able dict (``status``, ``test_accuracy``, ``test_loss``, ``steps``,
      ``frozen_exact``, ``audit``, ``variables``, ``history``, ...); with a
      perplexity metric also ``test_perplexity`` and ``val_perplexity`` (last epoch).
    """
    registry = state.registry
    rows = audit(registry)
    exact = registry.exact()
    whole = record.snapshot(state, status)
    history, segments = whole["history"], whole["segments"]
    spent = totals(segments)
    result = {
        "status": status,
        "test_accuracy": test.get("accuracy"),
        "test_loss": test["loss"],
        "steps": state.step,
        "trainable_elements": trainable_elements(registry),
        "epochs": state.step / state.steps_per_epoch if state.steps_per_epoch else 0,
        "wall_seconds": spent["wall_seconds"],
        "examples_per_second": spent["examples_per_second"],
        "steady_steps_per_second": state.timing.get("steady_steps_per_second"),
        "skipped_steps": state.skipped_steps,
        "frozen_exact": exact,
        "audit": audit_line(rows, exact),
        "variables": rows,
        "history": history,
        "early_stopping": early_stopping_summary(history),
        "segments": segments,
        "config_changes": [c for s in segments for c in s["config_changes"]],
    }
    if "perplexity" in test:  # a causal-LM run (trainer.text_data.objectives): exp of the mean token loss
        last = history[-1] if history else {}
        result.update(test_perplexity=test["perplexity"], val_perplexity=last.get("val_perplexity"))
    if error is not None:
        result["error"] = error
    return result


def write_run_files(run_dir: str, model, registry, result: Dict[str, Any], *, sparse: bool, keras: bool,
                    saved_model: bool, strip: bool = False, tflite: bool = False) -> None:
    """Writes a run's exports and then its ``report.json``, each atomically; a failed write is said, not hidden.

    ``masks.npz`` is always written; a completed or interrupted run also gets
    ``weights.npz`` and, as asked, ``sparse_weights.npz`` (its sizes go into
    ``result["sparse_export"]``), ``model.keras`` and ``saved_model/``. A
    failed run (``result["status"] == "failed"``) gets no weights or model.
    ``report.json`` comes last, so a report that says ``completed`` means
    every export is on disk. An export that cannot be written (disk full)
    does not stop the others; the report then says ``status: "failed"``,
    ``error`` and ``export_errors`` (``{file: error}``), and the call raises.

    Args:
      run_dir: the run directory (its lock held).
      model: the trained Keras model.
      registry: its :class:`~trainer.masks.MaskRegistry`.
      result: the :func:`run_report` dict (``sparse_export`` and, on a failed
        write, ``export_errors`` are added to it; ``status`` and ``error`` may be set).
      sparse, keras, saved_model, strip, tflite: the ``export.*`` switches (``stripped.keras``: what
        :func:`trainer.strip` keeps, its sizes in ``result["strip"]``, or the one line that refused it there as
        ``refused``; ``model.tflite``: of the stripped model when there is one).

    Raises:
      WriteError: one line naming every file that could not be written
        (:mod:`trainer.writes`), after ``report.json`` was written if it could be.
    """
    def path(name):
        return os.path.join(run_dir, name)

    def sparse_export():
        size = result["sparse_export"] = export_sparse_weights(model, registry, path("sparse_weights.npz"))
        log.info("sparse_weights.npz | %s bytes (dense weights %s bytes) | %s of %s covered elements stored",
                 f"{size['bytes']:,}", f"{size['dense_bytes']:,}", f"{size['nonzero']:,}", f"{size['elements']:,}")

    exports = [("masks.npz", lambda: export_masks(registry, path("masks.npz")))]
    if result["status"] != "failed":
        exports += [("sparse_weights.npz", sparse_export)] if sparse else []
        exports += [("weights.npz", lambda: export_weights(model, path("weights.npz")))]
        exports += [("model.keras", lambda: export_model(model, path("model.keras")))] if keras else []
        exports += [("saved_model", lambda: export_saved_model(model, path("saved_model")))] if saved_model else []
        stripped = {}

        def strip_export():
            stripped["model"], result["strip"] = strip_for_export(model, registry)
            if stripped["model"] is None:
                log.warning("stripped.keras not written: %s", result["strip"]["refused"])
                return
            export_model(stripped["model"], path("stripped.keras"))
            log.info("stripped.keras | %s of %s parameters", f"{result['strip']['params']:,}",
                     f"{result['strip']['params_before']:,}")

        exports += [("stripped.keras", strip_export)] if strip else []
        exports += [("model.tflite", lambda: export_tflite(stripped.get("model") or model, path("model.tflite")))
                    ] if tflite else []
    errors: Dict[str, str] = {}
    for name, export in exports:
        try:
            with writing(f"{name} in {run_dir}"):
                export()
        except WriteError as err:
            errors[name] = failure_text(err.__cause__)
    if errors:
        listed = "; ".join(f"{name}: {text}" for name, text in errors.items())
        message = f"could not write the exports of {run_dir} ({listed}); report.json says which"
        result.update(status="failed", export_errors=errors,
                      error=result.get("error") or f"{WriteError.__name__}: {message}")
    with writing(f"report.json in {run_dir}"):
        write_json(path("report.json"), result)
    if errors:
        raise WriteError(message)
