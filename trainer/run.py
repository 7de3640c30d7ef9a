"""Turns a config into objects, trains, audits and writes the run directory.

The only module that reads configs (besides the Hydra entry point). ``run(cfg)``
returns the report dict, so tests call it directly with a composed config.

Run directory contents: ``tb/`` (TensorBoard), ``checkpoints/``,
``model.keras``, ``masks.npz``, ``weights.npz``, ``report.json``,
``freeze_plan.json``, ``fingerprint.json``, Hydra's ``.hydra/`` and log file,
and ``run.lock`` while a process holds the directory. The contract (lock,
fresh-run and resume checks before anything is written) is in
:mod:`trainer.rundir`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict, List, Optional

import keras
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from trainer import report as reports
from trainer import rundir
from trainer.banner import log_banner
from trainer.callbacks import BestWeights, Callback, EarlyStopping
from trainer.checkpoint import CheckpointError, Checkpointing, latest_good
from trainer.config import ConfigError, check_config
from trainer.controller import stop_on_signals
from trainer.data import Splits, load_digits, load_mnist, make_dataset, select_classes, tokenize
from trainer.distribute import make_strategy, set_precision, split_cpu, worker_dir, wrap_optimizer
from trainer.loop import Trainer
from trainer.masks import MaskRegistry, rules_from_config
from trainer.models import build_model, enable_lora
from trainer.sft import apply_sft, trainable_elements
from trainer.progress import print_summary, progress_callback
from trainer.resume import ResumeError
from trainer.rundir import RunDirError, RunLock
from trainer.summaries import Profile, TensorBoard

log = logging.getLogger("trainer")


def run_dir_of(cfg: DictConfig) -> str:
    """Hydra's output directory for this job (the current directory outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except ValueError:
        return os.getcwd()


HPARAM_KEYS = ("seed", "data.name", "model.name", "optimizer.name", "optimizer.learning_rate",
               "trainer.batch_size", "trainer.epochs")
HPARAM_IGNORED = ("hydra", "log", "export", "resume", "dry_run")  # overrides that do not change the result


def hparams_of(cfg: DictConfig) -> Dict[str, Any]:
    """The run's hyperparameters for TensorBoard's HParams table.

    The fixed ``HPARAM_KEYS`` plus every key overridden on the command line
    (Hydra's ``overrides.task``; in a multirun job, the swept ones) except
    those under ``HPARAM_IGNORED``, valued
    from the composed config, or by the override's text for config-group
    choices (``+experiment=sparse_mlp``, ``freeze=[a,b]``) and lists.
    """
    out = {key: OmegaConf.select(cfg, key, default=None) for key in HPARAM_KEYS}
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        overrides = []
    for override in overrides:
        key, _, text = override.lstrip("+~").partition("=")
        if key.split(".")[0] in HPARAM_IGNORED:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        out[key] = value if isinstance(value, (bool, int, float, str)) else text
    return {key: value for key, value in out.items() if value is not None}


def load_data(cfg: DictConfig, seed: int) -> Splits:
    """Loads the dataset named by ``cfg.name`` (``mnist`` or ``digits``).

    Raises:
      ValueError: an unknown dataset name (the known ones are listed).
    """
    if cfg.name == "mnist":
        splits = load_mnist(cfg.get("path"), validation_size=int(cfg.validation_size))
    elif cfg.name == "digits":
        splits = load_digits(validation_size=int(cfg.validation_size), seed=seed)
    else:
        raise ValueError(f"unknown data.name {cfg.name!r}; known: ['mnist', 'digits']")
    if cfg.get("classes"):
        splits = select_classes(splits, list(cfg.classes))
    if cfg.get("tokens"):
        splits = tokenize(splits, int(cfg.tokens))
    return splits


MODEL_RUN_KEYS = ("name", "init_seed", "init_from", "init_exclude", "init_from_partial", "lora_rank", "lora_layers",
                  "lora_alpha")


def load_initial_weights(model: keras.Model, path: str, exclude, partial: bool = False) -> list:
    """Assigns values from a ``weights.npz`` (arrays keyed by variable path) to matching variables.

    Variables matching an ``exclude`` glob are left at their initialization
    (e.g. a new output head). Every array is checked before any is assigned
    (:mod:`trainer.npfiles`): a regular ``.npz`` file within the size limit,
    the variable's shape read from the header before the data, numbers that
    are finite and representable in the variable's dtype. Returns the paths
    loaded.

    Args:
      model: the built model.
      path: the ``.npz`` file (``model.init_from``).
      exclude: globs of variable paths to leave alone (``model.init_exclude``).
      partial: allow variables that the file lacks to keep their random
        initialization (``model.init_from_partial``).

    Raises:
      ValueError: one line naming the file and the problem: not a regular
        ``.npz`` file, a shape, dtype or value that does not fit, variables the
        file lacks (without ``partial``), or none of the model's variables.
    """
    from trainer.masks.variables import path_matches
    from trainer.npfiles import NpzReader, check_values

    where = f"model.init_from {str(path)!r}"
    wanted = [v for v in model.variables if not any(path_matches(p, v.path) for p in exclude)]
    values = {}
    with NpzReader(path, "model.init_from") as data:
        for v in wanted:
            if v.path not in data.files:
                continue
            shape, _ = data.header(v.path)
            if tuple(shape) != tuple(v.shape):
                raise ValueError(f"{where}: {v.path!r} has shape {shape}, the model's has {tuple(v.shape)}; "
                                 "exclude it with model.init_exclude")
            values[v.path] = check_values(v.path, data.array(v.path), v.dtype, where)
        if not values:
            raise ValueError(f"{where} holds none of the model's variables; it has {sorted(data.files)[:10]}")
    missing = [v.path for v in wanted if v.path not in values]
    if missing and not partial:
        raise ValueError(f"{where} has no array for {len(missing)} of the model's variables ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}); they would keep their random initialization: "
                         "exclude them with model.init_exclude, or set model.init_from_partial=true")
    for v in wanted:
        if v.path in values:
            v.assign(values[v.path])
    return list(values)


SCHEDULES = ("constant", "cosine")


def make_optimizer(cfg: DictConfig, total_steps: int) -> keras.optimizers.Optimizer:
    """A Keras optimizer from ``{name, learning_rate, schedule, options}``.

    ``schedule: cosine`` decays the learning rate to 0 over ``total_steps``
    with ``keras.optimizers.schedules.CosineDecay``; ``constant`` keeps it.

    Raises:
      ValueError: unknown optimizer name, schedule or option.
    """
    options = cfg.get("options")
    options = OmegaConf.to_container(options, resolve=True) if options is not None else {}
    schedule = cfg.get("schedule") or "constant"
    if schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    learning_rate = float(cfg.learning_rate)
    if schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(int(total_steps), 1))
    try:
        return keras.optimizers.get({"class_name": cfg.name, "config": {"learning_rate": learning_rate, **options}})
    except (ValueError, TypeError) as err:
        raise ValueError(f"optimizer {cfg.name!r} with options {options}: {err}") from None


def build_registry(model: keras.Model, rules_cfg: Any, update: str = "auto") -> MaskRegistry:
    """A registry of ``model`` (``freeze.update``) with every rule of ``freeze.rules`` applied (in config order)."""
    registry = MaskRegistry(model, update=update)
    rules = OmegaConf.to_container(rules_cfg, resolve=True) if isinstance(rules_cfg, DictConfig) else rules_cfg
    for rule in rules_from_config(rules):
        registry.add_rule(rule)
    return registry


def build(cfg: DictConfig, strategy: Optional[tf.distribute.Strategy] = None):
    """Data, model, optimizer and registry from a config; everything is checked here, before training.

    The model, optimizer and registry are created in ``strategy``'s scope.
    """
    check_config(cfg)
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(int(cfg.seed))
    tf.random.set_global_generator(tf.random.Generator.from_seed(int(cfg.seed)))
    if cfg.trainer.deterministic:
        tf.config.experimental.enable_op_determinism()
    splits = load_data(cfg.data, int(cfg.seed))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_options = {k: v for k, v in model_cfg.items() if k not in MODEL_RUN_KEYS}
    precision = cfg.trainer.get("mixed_precision")
    set_precision(precision)
    with strategy.scope():
        if model_cfg.get("init_seed") is not None:
            keras.utils.set_random_seed(int(model_cfg["init_seed"]))  # another initialization, same data order
        model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, **model_options)
        keras.utils.set_random_seed(int(cfg.seed))
        if model_cfg.get("init_from"):
            loaded = load_initial_weights(model, str(model_cfg["init_from"]), model_cfg.get("init_exclude") or [],
                                          partial=bool(model_cfg.get("init_from_partial")))
            log.info("initialized %d variables from %s", len(loaded), model_cfg["init_from"])
        if model_cfg.get("lora_rank"):
            enabled = enable_lora(model, rank=model_cfg["lora_rank"], layers=model_cfg.get("lora_layers"),
                                  alpha=model_cfg.get("lora_alpha"))
            log.info("LoRA rank %d on %d layers", model_cfg["lora_rank"], len(enabled))
        steps_per_epoch = -(-len(splits.x_train) // int(cfg.trainer.batch_size))
        total_steps = int(cfg.trainer.epochs) * steps_per_epoch
        if cfg.trainer.max_steps is not None:
            total_steps = min(total_steps, int(cfg.trainer.max_steps))
        optimizer = wrap_optimizer(make_optimizer(cfg.optimizer, total_steps), precision)
        registry = build_registry(model, cfg.freeze.rules, update=cfg.freeze["update"])
        kept = apply_sft(cfg.get("sft"), model=model, registry=registry, x=splits.x_train, y=splits.y_train,
                         batch_size=int(cfg.trainer.batch_size), seed=int(cfg.seed))
        if kept:
            log.info("sparse fine-tuning (%s): %d elements kept trainable", cfg.sft.method, kept)
    return splits, model, optimizer, registry


def _plan_table(registry: MaskRegistry) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="freeze plan")
    for col in ("variable", "shape", "dtype", "frozen", "fraction", "value", "rules"):
        table.add_column(col)
    for row in registry.plan():
        table.add_row(row["path"], str(tuple(row["shape"])), row["dtype"], f"{row['frozen_elements']:,}",
                      f"{row['frozen_fraction']:.4f}", row["value"] or "-", ", ".join(row["rules"]) or "-")
    # Not a terminal (a log, CI): a wide console, so variable paths are not cut.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


class TestEachEpoch(Callback):
    """Evaluates the test set after every epoch, adding ``test_loss`` / ``test_accuracy`` to the epoch's logs.

    Args:
      trainer: the trainer whose ``evaluate`` runs.
      dataset: the batched test dataset.
    """

    def __init__(self, trainer: Trainer, dataset: tf.data.Dataset):
        self.trainer, self.dataset = trainer, dataset

    def on_epoch_end(self, state, epoch: int, step: int, logs: Dict[str, Any]) -> None:
        logs.update({"test_" + k: v for k, v in self.trainer.evaluate(self.dataset).items()})


def early_stopping_summary(history) -> Optional[Dict[str, Any]]:
    """The epoch of lowest validation loss and the test metrics there (Frankle & Carbin 2019's protocol)."""
    rows = [(i, h) for i, h in enumerate(history, 1) if "val_loss" in h and "test_accuracy" in h]
    if not rows:
        return None
    epoch, best = min(rows, key=lambda r: r[1]["val_loss"])
    return {"epoch": epoch, "val_loss": best["val_loss"], "val_accuracy": best.get("val_accuracy"),
            "test_loss": best["test_loss"], "test_accuracy": best["test_accuracy"]}


def write_records(cfg: DictConfig, run_dir: str, registry: MaskRegistry, fingerprint: Optional[Dict[str, Any]],
                  resume: bool) -> None:
    """Writes what describes the run, after every check passed: ``.hydra/``, ``fingerprint.json``, ``freeze_plan.json``.

    Hydra's own ``.hydra/`` writing is off (``hydra.output_subdir: null``) so
    that a refused run changes nothing; these are the same files, written
    here. A resumed run keeps ``.hydra/overrides.yaml`` (how the run was
    started); its config and the plan are those of the run as it continues.
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:
        hydra_cfg = None
    if hydra_cfg is not None and os.path.abspath(hydra_cfg.runtime.output_dir) == os.path.abspath(run_dir):
        hydra_dir = os.path.join(run_dir, ".hydra")
        os.makedirs(hydra_dir, exist_ok=True)
        rundir.write_text(os.path.join(hydra_dir, "config.yaml"), OmegaConf.to_yaml(cfg))
        rundir.write_text(os.path.join(hydra_dir, "hydra.yaml"), OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
        if not resume or not os.path.exists(os.path.join(hydra_dir, "overrides.yaml")):
            rundir.write_text(os.path.join(hydra_dir, "overrides.yaml"),
                              OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))))
    if fingerprint is not None:
        rundir.write_json(os.path.join(run_dir, rundir.FINGERPRINT_NAME), fingerprint)
    reports.write_json(os.path.join(run_dir, "freeze_plan.json"), {"variables": registry.plan()})


def check_run_dir(cfg: DictConfig, run_dir: str) -> List[Dict[str, Any]]:
    """The checks before anything is written into ``run_dir`` (call it with the run lock held).

    A fresh run needs a directory without an earlier run's files; a resumed
    run needs a readable checkpoint whose stored fingerprint matches this
    config (up to a longer run, or changes allowed by ``resume_allow_changes``).

    Returns:
      The accepted config changes of a resume (``[]`` otherwise).

    Raises:
      RunDirError: another run's files, or a changed config.
      ResumeError: nothing to resume.
      CheckpointError: checkpoints exist but none reads back whole.
    """
    if not cfg.get("resume"):
        rundir.check_fresh(run_dir)
        return []
    if cfg.dry_run:
        raise RunDirError("dry_run=true plans a new run and cannot be combined with resume=; drop one of them")
    path, record, bad = latest_good(run_dir)
    if path is None:
        if bad:
            raise CheckpointError(f"no readable checkpoint in {os.path.join(run_dir, 'checkpoints')}: "
                                  + "; ".join(f"{p} ({e})" for p, e in bad))
        raise ResumeError(f"resume: {run_dir!r} has no checkpoints/ckpt-*.index to continue from")
    if not record or "fingerprint" not in record:
        raise RunDirError(f"resume={run_dir}: checkpoint {path} stores no config fingerprint, so the config cannot "
                          "be checked; start a new run without resume=")
    allowed = list(cfg.get(rundir.ALLOW_KEY) or [])
    return rundir.check_changes(run_dir, record["fingerprint"], run_fingerprint(cfg), allowed)


def early_stopping_callbacks(cfg: DictConfig, run_dir: str, *, has_validation: bool) -> List[Callback]:
    """``early_stopping.*`` as callbacks: :class:`EarlyStopping` and, with ``save_best``, :class:`BestWeights`.

    Returns:
      An empty list when ``early_stopping.monitor`` is null.

    Raises:
      ConfigError: a ``val_*`` metric is monitored but the data has no validation split.
    """
    stopping = cfg.get("early_stopping") or {}
    monitor = stopping.get("monitor")
    if monitor is None:
        return []
    if monitor.startswith("val_") and not has_validation:
        raise ConfigError(f"early_stopping.monitor={monitor} needs a validation split, but data.validation_size is 0; "
                          "set data.validation_size > 0 or monitor loss / accuracy")
    out: List[Callback] = [EarlyStopping(monitor, patience=int(stopping.get("patience", 3)),
                                         min_delta=float(stopping.get("min_delta", 0.0)),
                                         restore_best_weights=bool(stopping.get("restore_best_weights", True)))]
    if stopping.get("save_best", True):
        out.append(BestWeights(os.path.join(run_dir, "best_weights.npz"), monitor))
    return out


def run_fingerprint(cfg: DictConfig) -> Dict[str, Any]:
    """:func:`trainer.rundir.fingerprint` of a composed config."""
    return rundir.fingerprint(OmegaConf.to_container(cfg, resolve=True))


def run(cfg: DictConfig, run_dir: Optional[str] = None) -> Dict[str, Any]:
    """Trains (or, with ``dry_run``, only plans) one configured run.

    Nothing is written into the run directory before its lock is taken and
    :func:`check_run_dir` passed; a refusal leaves it as it was.

    Args:
      cfg: the composed config.
      run_dir: where to write; by default Hydra's output directory (the
        current directory outside Hydra).

    Returns:
      The report written to ``report.json`` (or ``{"status": "dry_run", ...}``).

    Raises:
      RunDirError, ResumeError: the run directory cannot hold this run (in
        use, another run's files, a changed config, nothing to resume).
      FreezeConfigError, DataError, ConfigError, ValueError: bad input, before training.
      NonFiniteLossError: the loss diverged with ``nan_policy=stop``.
    """
    run_dir = run_dir or run_dir_of(cfg)
    check_config(cfg)  # a bad value is named first, whatever the run directory holds
    if cfg.get("resume") and not os.path.isdir(run_dir):
        raise ResumeError(f"resume={run_dir!r} is not a directory; pass the run directory of an earlier run")
    distribute = cfg.get("distribute") or {}
    split_cpu(distribute.get("logical_cpu_devices"))
    strategy = make_strategy(str(distribute.get("strategy") or "none"))
    run_dir = worker_dir(run_dir, strategy)
    os.makedirs(run_dir, exist_ok=True)
    with RunLock(run_dir):
        changes = check_run_dir(cfg, run_dir)
        rundir.clean_leftovers(run_dir)
        return _run_locked(cfg, run_dir, strategy, changes)


def _run_locked(cfg: DictConfig, run_dir: str, strategy, changes: List[Dict[str, Any]]) -> Dict[str, Any]:
    resume = bool(cfg.get("resume"))
    record = reports.RunRecord(fingerprint=run_fingerprint(cfg), config_changes=changes)
    splits, model, optimizer, registry = build(cfg, strategy)
    log_banner(run_dir=run_dir, splits=splits, model=model, plan=registry.plan(), cfg=cfg)
    if cfg.dry_run:
        write_records(cfg, run_dir, registry, None, resume)
        _plan_table(registry)
        log.info("dry run: plan written to %s", os.path.join(run_dir, "freeze_plan.json"))
        return {"status": "dry_run", "variables": registry.plan()}

    t = cfg.trainer
    trainer = Trainer(
        model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], registry=registry, steps_per_execution=int(t.steps_per_execution),
        jit_compile=bool(t.jit_compile), nan_policy=str(t.nan_policy), strategy=strategy,
    )
    seed = int(cfg.seed)
    train_ds = make_dataset(splits.x_train, splits.y_train, int(t.batch_size), shuffle=True, seed=seed)
    val_ds = make_dataset(splits.x_val, splits.y_val, int(t.eval_batch_size), shuffle=False, seed=seed) \
        if len(splits.x_val) else None
    test_ds = make_dataset(splits.x_test, splits.y_test, int(t.eval_batch_size), shuffle=False, seed=seed)

    checkpointing = Checkpointing(os.path.join(run_dir, "checkpoints"), every_n_steps=int(t.checkpoint_every_n_steps),
                                  keep=int(t.keep_checkpoints), record=record.snapshot)
    if resume:
        if checkpointing.restore_now(trainer.state()) is None:  # checked before; the files went away since
            raise ResumeError(f"resume: {run_dir!r} has no checkpoints/ckpt-*.index to continue from")
        record.restore(checkpointing.restored_record)
    write_records(cfg, run_dir, registry, record.fingerprint, resume)
    tensorboard = TensorBoard(
        os.path.join(run_dir, "tb"),
        summary_every_n_steps=int(cfg.log.summary_every_n_steps),
        histogram_every_n_steps=int(cfg.log.histogram_every_n_steps),
        texts={"config": "```\n" + OmegaConf.to_yaml(cfg) + "\n```", "freeze_plan": registry.describe()},
        hparams=hparams_of(cfg),
        gradient_batch=(splits.x_train[:int(t.batch_size)], splits.y_train[:int(t.batch_size)]),
    )
    callbacks = [progress_callback(str(cfg.log.progress), int(t.log_every_n_steps)), tensorboard, record,
                 checkpointing]
    if cfg.log.profile_steps:
        callbacks.append(Profile(os.path.join(run_dir, "tb", "train"), list(cfg.log.profile_steps)))
    if cfg.log.test_every_epoch:
        callbacks.insert(0, TestEachEpoch(trainer, test_ds))
    callbacks += early_stopping_callbacks(cfg, run_dir, has_validation=val_ds is not None)

    status, error = "failed", None
    with stop_on_signals(trainer.progress):  # until the last file is written
        try:
            trainer.fit(train_ds, val_ds, epochs=int(t.epochs), initial_epoch=0, max_steps=t.max_steps,
                        callbacks=callbacks)  # epochs counted from step 0: a resumed run continues
            status = trainer.status  # decided by fit: completed or interrupted
        except BaseException as err:
            error = f"{type(err).__name__}: {err}"
            raise
        finally:
            result = finish_run(cfg, run_dir, trainer, test_ds, tensorboard, status, error, record)
    return result


def finish_run(cfg, run_dir, trainer, test_ds, tensorboard, status, error, record) -> Dict[str, Any]:
    """Evaluates the test set, audits the frozen elements, writes report.json and the exports.

    The report's ``history``, ``segments``, ``wall_seconds`` and
    ``examples_per_second`` cover the whole run, earlier segments (before a
    resume) included; ``config_changes`` lists every change accepted with
    ``resume_allow_changes``. A failed run (``status="failed"``) is neither
    tested nor exported: its report gives ``status``, ``error`` and the step
    it reached, with no test metrics; no ``model.keras``, SavedModel or
    ``weights.npz`` is written.
    """
    registry, model = trainer.registry, trainer.model
    failed = status == "failed"
    test = {"loss": None} if failed else trainer.evaluate(test_ds)
    if not failed:
        tensorboard.write_test(trainer.step, test)
    tensorboard.close()
    rows = reports.audit(registry)
    exact = registry.exact()
    whole = record.snapshot(trainer.state(), status)
    history, segments = whole["history"], whole["segments"]
    totals = reports.totals(segments)
    result = {
        "status": status,
        "test_accuracy": test.get("accuracy"),
        "test_loss": test["loss"],
        "steps": trainer.step,
        "trainable_elements": trainable_elements(registry),
        "epochs": trainer.step / trainer.steps_per_epoch if trainer.steps_per_epoch else 0,
        "wall_seconds": totals["wall_seconds"],
        "examples_per_second": totals["examples_per_second"],
        "steady_steps_per_second": trainer.timing.get("steady_steps_per_second"),
        "skipped_steps": trainer.skipped_steps,
        "frozen_exact": exact,
        "audit": reports.audit_line(rows, exact),
        "variables": rows,
        "history": history,
        "early_stopping": early_stopping_summary(history),
        "segments": segments,
        "config_changes": [c for s in segments for c in s["config_changes"]],
    }
    if error is not None:
        result["error"] = error
    if cfg.export.sparse and not failed:  # before report.json, which gives its size
        size = result["sparse_export"] = reports.export_sparse_weights(model, registry,
                                                                       os.path.join(run_dir, "sparse_weights.npz"))
        log.info("sparse_weights.npz | %s bytes (dense weights %s bytes) | %s of %s covered elements stored",
                 f"{size['bytes']:,}", f"{size['dense_bytes']:,}", f"{size['nonzero']:,}", f"{size['elements']:,}")
    reports.write_json(os.path.join(run_dir, "report.json"), result)
    reports.export_masks(registry, os.path.join(run_dir, "masks.npz"))
    if failed:
        log.error("run failed at step %d: %s (no test evaluation, no model written)", trainer.step, error)
        return result
    reports.export_weights(model, os.path.join(run_dir, "weights.npz"))
    if cfg.export.keras:
        reports.export_model(model, os.path.join(run_dir, "model.keras"))
    if cfg.export.saved_model:
        reports.export_saved_model(model, os.path.join(run_dir, "saved_model"))
    log.info("test | loss %.4f | accuracy %.4f | %s | %.1f s", test["loss"], test.get("accuracy", float("nan")),
             result["audit"], totals["wall_seconds"])
    print_summary(result)
    return result
