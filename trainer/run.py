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
from typing import Any, Dict, List, Optional

import keras
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from trainer import report as reports
from trainer import rundir
from trainer.banner import log_banner
from trainer.callbacks import BestWeights, Callback, StopOnPlateau, TestEachEpoch
from trainer.checkpoint import Checkpointing
from trainer.config import ConfigError, check_config
from trainer.controller import stop_on_signals
from trainer.data_digest import data_digest
from trainer.data import Splits, load_digits, load_mnist, select_classes, split_datasets, standardize, tokenize
from trainer.distribute import make_strategy, set_precision, split_cpu, worker_dir, wrap_optimizer
from trainer.loop import Trainer
from trainer.masks import MaskRegistry, rules_from_config
from trainer.models import build_model, enable_lora
from trainer.pretrained import load_initial_weights
from trainer.optimizer_config import schedule_problem, step_decay
from trainer.allocator import low_memory_allocator
from trainer.remat import apply_remat
from trainer.progress import print_plan, print_summary, progress_callback
from trainer.resume import ResumeError, check_allowed, check_resumable, nothing_to_resume
from trainer.rundir import RunDirError, RunLock
from trainer.sft import apply_sft
from trainer.summaries import FreezeSummaries, Profile
from trainer.text_data import load_text, objectives

__all__ = ["build", "build_registry", "check_run_dir", "early_stopping_callbacks", "finish_run", "hparams_of",
           "load_data", "make_optimizer", "run", "run_dir_of", "run_fingerprint"]

log = logging.getLogger("trainer")


def run_dir_of(cfg: DictConfig) -> str:
    """Hydra's output directory for this job (the current directory outside Hydra)."""
    hydra = rundir.hydra_config()
    return hydra.runtime.output_dir if hydra is not None else os.getcwd()


HPARAM_KEYS = ("seed", "data.name", "model.name", "optimizer.name", "optimizer.learning_rate",
               "trainer.batch_size", "trainer.epochs")
HPARAM_IGNORED = ("hydra", "log", "export", "resume", "dry_run")  # overrides that do not change the result


def hparams_of(cfg: DictConfig) -> Dict[str, Any]:
    """The run's hyperparameters for TensorBoard's HParams table.

    The fixed ``HPARAM_KEYS`` plus every key overridden on the command line
    (Hydra's ``overrides.task``; in a multirun job, the swept ones) except
    those under ``HPARAM_IGNORED``, valued from the composed config, or by the
    override's text for group choices (``+experiment=x``, ``freeze=[a,b]``) and lists.

    Returns:
      ``{key: bool, int, float or str}``, ``None`` values left out.
    """
    out = {key: OmegaConf.select(cfg, key, default=None) for key in HPARAM_KEYS}
    hydra = rundir.hydra_config()
    for override in list(hydra.overrides.task) if hydra is not None else []:
        key, _, text = override.lstrip("+~").partition("=")
        if key.split(".")[0] in HPARAM_IGNORED:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        out[key] = value if isinstance(value, (bool, int, float, str)) else text
    return {key: value for key, value in out.items() if value is not None}


def load_data(cfg: DictConfig, seed: int) -> Splits:
    """Loads the dataset named by ``cfg.name`` (``mnist``, ``digits`` or ``text``).

    Args:
      cfg: the ``data`` block (``name``, ``validation_size``, optional
        ``path``, ``classes`` and ``tokens``; for ``text`` the keywords of
        :func:`trainer.text_data.load_text`).
      seed: the digits split's shuffle seed.

    Returns:
      :class:`trainer.data.Splits`: float32 images ``(N, H, W, 1)`` in [0, 1]
      (int32 tokens ``(N, H*W)`` with ``tokens``), int32 labels ``(N,)``; for
      ``text`` a :class:`trainer.text_data.TextSplits` of int32 ``(N, L)`` sequences.

    Raises:
      ValueError: an unknown dataset name (the known ones are listed).
      DataError: the data cannot be read or is unfit (:mod:`trainer.data`).
    """
    if cfg.name == "mnist":
        splits = load_mnist(cfg.get("path"), validation_size=int(cfg.validation_size))
    elif cfg.name == "digits":
        splits = load_digits(validation_size=int(cfg.validation_size), seed=seed)
    elif cfg.name == "text":
        return load_text(**{k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "name"})
    else:
        raise ValueError(f"unknown data.name {cfg.name!r}; known: ['mnist', 'digits', 'text']")
    if cfg.get("classes"):
        splits = select_classes(splits, list(cfg.classes))
    if cfg.get("tokens"):
        splits = tokenize(splits, int(cfg.tokens))
    if cfg.get("standardize") is not None:
        stats = cfg.standardize
        splits = standardize(splits, list(stats) if OmegaConf.is_list(stats) else stats)
    return splits


MODEL_RUN_KEYS = ("name", "init_seed", "init_from", "init_exclude", "init_from_partial", "init_from_made_by",
                  "lora_rank", "lora_layers", "lora_alpha")


def make_optimizer(cfg: DictConfig, total_steps: int) -> keras.optimizers.Optimizer:
    """A Keras optimizer from ``{name, learning_rate, schedule, options}``.

    ``schedule: cosine`` decays the learning rate to 0 over ``total_steps``
    with ``keras.optimizers.schedules.CosineDecay``; ``constant`` keeps it;
    ``{kind: step, every_n_steps: N, factor: f}`` multiplies it by ``f``
    every ``N`` batches (:func:`trainer.optimizer_config.step_decay`).

    Raises:
      ValueError: unknown optimizer name, schedule or option.
    """
    options = cfg.get("options")
    options = OmegaConf.to_container(options, resolve=True) if options is not None else {}
    schedule = cfg.get("schedule") or "constant"
    problem = schedule_problem(schedule)
    if problem:
        raise ValueError(problem)
    learning_rate = float(cfg.learning_rate)
    if schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(int(total_steps), 1))
    elif not isinstance(schedule, str):  # {kind: step, every_n_steps, factor}: PyTorch's StepLR per batch
        learning_rate = step_decay(learning_rate, int(schedule.every_n_steps), float(schedule.factor), total_steps)
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

    Seeds Keras, NumPy and TensorFlow with ``cfg.seed`` (``model.init_seed``
    for the initialization only), loads ``model.init_from``, enables
    ``model.lora_rank``, wraps the blocks for ``trainer.remat``, applies ``sft``, all in ``strategy``'s scope.

    Args:
      cfg: the composed config.
      strategy: a ``tf.distribute`` strategy (default: the current one).

    Returns:
      ``(splits, model, optimizer, registry)``: :class:`trainer.data.Splits`,
      the built ``keras.Model`` (float32 logits ``(batch, num_classes)``), its
      Keras optimizer (wrapped for mixed precision where set) and a
      :class:`~trainer.masks.MaskRegistry` with every freeze rule added.

    Raises:
      ConfigError: a value out of its range (:func:`trainer.config.check_config`).
      FreezeConfigError: a bad freeze rule.
      DataError, ValueError: bad data, model, optimizer or ``init_from`` file.
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
                                          partial=bool(model_cfg.get("init_from_partial")),
                                          made_by=model_cfg.get("init_from_made_by"))
            log.info("initialized %d variables from %s", len(loaded), model_cfg["init_from"])
        if model_cfg.get("lora_rank"):
            enabled = enable_lora(model, rank=model_cfg["lora_rank"], layers=model_cfg.get("lora_layers"),
                                  alpha=model_cfg.get("lora_alpha"))
            log.info("LoRA rank %d on %d layers", model_cfg["lora_rank"], len(enabled))
        if cfg.trainer.remat:
            log.info("remat: %d transformer blocks recomputed in the backward", len(apply_remat(model)))
        steps_per_epoch = -(-len(splits.x_train) // int(cfg.trainer.batch_size))
        total_steps = int(cfg.trainer.epochs) * steps_per_epoch
        if cfg.trainer.max_steps is not None:
            total_steps = min(total_steps, int(cfg.trainer.max_steps))
        optimizer = wrap_optimizer(make_optimizer(cfg.optimizer, total_steps), precision)
        registry = build_registry(model, cfg.freeze.rules, update=cfg.freeze["update"])
        kept = apply_sft(cfg.get("sft"), model=model, registry=registry, x=splits.x_train, y=splits.y_train,
                         batch_size=int(cfg.trainer.batch_size), seed=int(cfg.seed), loss=objectives(splits)[0])
        if kept:
            log.info("sparse fine-tuning (%s): %d elements kept trainable", cfg.sft.method, kept)
    return splits, model, optimizer, registry


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
    return check_resumable(run_dir, run_fingerprint(cfg), list(cfg.get(rundir.ALLOW_KEY) or []))


def early_stopping_callbacks(cfg: DictConfig, run_dir: str, *, has_validation: bool) -> List[Callback]:
    """``early_stopping.*`` as callbacks: :class:`StopOnPlateau` and, with ``save_best``, :class:`BestWeights`.

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
    out: List[Callback] = [StopOnPlateau(monitor, patience=int(stopping.get("patience", 3)),
                                         min_delta=float(stopping.get("min_delta", 0.0)),
                                         restore_best_weights=bool(stopping.get("restore_best_weights", True)))]
    if stopping.get("save_best", True):
        out.append(BestWeights(os.path.join(run_dir, "best_weights.npz"), monitor))
    return out


def run_fingerprint(cfg: DictConfig) -> Dict[str, Any]:
    """:func:`trainer.rundir.fingerprint` of a composed config, plus its data digest (:mod:`trainer.data_digest`)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return {**rundir.fingerprint(config), **data_digest(config.get("data") or {})}


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
    if cfg.get("resume"):
        check_allowed(list(cfg.get(rundir.ALLOW_KEY) or []))  # before the run directory is touched
    if cfg.get("resume") and not os.path.isdir(run_dir):
        raise ResumeError(f"resume={run_dir!r} is not a directory; pass the run directory of an earlier run")
    if cfg.trainer.get("low_memory_allocator"):
        log.info("allocator: %s", low_memory_allocator())  # before TensorFlow creates its devices
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
        rundir.write_records(run_dir, cfg, registry.plan(), None, resume=resume)
        print_plan(registry.plan())
        log.info("dry run: plan written to %s", os.path.join(run_dir, "freeze_plan.json"))
        return {"status": "dry_run", "variables": registry.plan()}

    t = cfg.trainer
    loss, metrics = objectives(splits)  # text: next-token loss over non-pad tokens and perplexity
    trainer = Trainer(
        model, optimizer, loss, metrics=metrics, registry=registry, steps_per_execution=int(t.steps_per_execution),
        jit_compile=bool(t.jit_compile), nan_policy=str(t.nan_policy), strategy=strategy,
    )
    train_ds, val_ds, test_ds = split_datasets(splits, int(t.batch_size), int(t.eval_batch_size), seed=int(cfg.seed))

    checkpointing = Checkpointing(os.path.join(run_dir, "checkpoints"), every_n_steps=int(t.checkpoint_every_n_steps),
                                  keep=int(t.keep_checkpoints), record=record.snapshot)
    if resume:
        if checkpointing.restore_now(trainer.state()) is None:  # checked before; the files went away since
            raise nothing_to_resume(run_dir)
        record.restore(checkpointing.restored_record)
    rundir.write_records(run_dir, cfg, registry.plan(), record.fingerprint, resume=resume)
    tensorboard = FreezeSummaries(
        os.path.join(run_dir, "tb"),
        summary_every_n_steps=int(cfg.log.summary_every_n_steps),
        histogram_every_n_steps=int(cfg.log.histogram_every_n_steps),
        texts={"config": "```\n" + OmegaConf.to_yaml(cfg) + "\n```", "freeze_plan": registry.describe()},
        hparams=hparams_of(cfg),
        gradient_batch=(splits.x_train[:int(t.batch_size)], splits.y_train[:int(t.batch_size)]),
    )
    callbacks = [progress_callback(str(cfg.log.progress), t.log_every_n_steps), tensorboard, record,
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
    """Tests, audits, writes the report and the exports (:func:`trainer.report.run_report`, ``write_run_files``).

    A failed run (``status="failed"``) is neither tested nor exported: its
    report gives ``status``, ``error`` and the step it reached.
    """
    failed = status == "failed"
    test = {"loss": None} if failed else trainer.evaluate(test_ds)
    if not failed:
        tensorboard.write_test(trainer.step, test)
    tensorboard.close()
    result = reports.run_report(trainer.state(), record, status=status, test=test, error=error)
    reports.write_run_files(run_dir, trainer.model, trainer.registry, result, sparse=bool(cfg.export.sparse),
                            keras=bool(cfg.export.keras), saved_model=bool(cfg.export.saved_model),
                            strip=bool(cfg.export.strip), tflite=bool(cfg.export.tflite))
    if failed:
        log.error("run failed at step %d: %s (no test evaluation, no model written)", trainer.step, error)
        return result
    metric = "perplexity" if "perplexity" in test else "accuracy"
    log.info("test | loss %.4f | %s %.4f | %s | %.1f s", test["loss"], metric, test.get(metric, float("nan")),
             result["audit"], result["wall_seconds"])
    print_summary(result)
    return result
