"""Config schema (OmegaConf structured configs) registered in Hydra's ConfigStore.

Only ``run.py`` and ``__main__.py`` use configs. Typed fields make Hydra reject
bad values at composition, in its usual message style, e.g.
``trainer.epochs=abc`` -> "Value 'abc' of type 'str' could not be converted to Integer".
Ranges are checked by :func:`check_config` before anything is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from trainer.loop import NAN_POLICIES
from trainer.masks.checks import is_whole, positive_int
from trainer.masks.updates import UPDATE_MODES

__all__ = ["EARLY_STOPPING_MONITORS", "Config", "ConfigError", "DistributeConfig", "EarlyStoppingConfig",
           "ExportConfig", "FreezeConfig", "LogConfig", "SFTConfig", "TrainerConfig", "check_config", "known_keys",
           "register"]


@dataclasses.dataclass
class TrainerConfig:
    """``trainer.*``: the loop's length, batch sizes, execution, checkpoints and non-finite policy."""

    epochs: int = 10
    max_steps: Optional[int] = None
    batch_size: int = 60
    eval_batch_size: int = 1000
    steps_per_execution: int = 1
    jit_compile: bool = False
    log_every_n_steps: Optional[int] = None  # None: one line per epoch; N: also a line every N steps
    checkpoint_every_n_steps: int = 1000
    keep_checkpoints: int = 3
    deterministic: bool = False
    nan_policy: str = "stop"
    mixed_precision: Optional[str] = None
    remat: bool = False  # recompute each transformer block's activations in the backward (trainer/remat.py)
    low_memory_allocator: bool = False  # oneDNN tensors from malloc, a fixed mmap threshold (trainer/allocator.py)


@dataclasses.dataclass
class LogConfig:
    """``log.*``: summary and histogram intervals, per-epoch test, progress display, profiling."""

    summary_every_n_steps: int = 100
    histogram_every_n_steps: int = 1000
    test_every_epoch: bool = False
    progress: str = "auto"
    profile_steps: Optional[List[int]] = None
    verbose: bool = False


@dataclasses.dataclass
class ExportConfig:
    """``export.*``: which files a finished run writes besides ``weights.npz`` and ``masks.npz``."""

    keras: bool = True
    saved_model: bool = False
    sparse: bool = False  # sparse_weights.npz: covered variables as COO indices + values (trainer/sparse_export.py)
    strip: bool = False  # stripped.keras: without the units frozen at zero (trainer/stripping.py)
    tflite: bool = False  # model.tflite (of the stripped model with strip), sparse weights encoded (lite_export.py)


@dataclasses.dataclass
class FreezeConfig:
    """``freeze.*``: the freeze rules by name (:func:`trainer.masks.rules_from_config`) and the update mode."""

    rules: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # How partly frozen variables are updated: auto | dense | compact (see trainer/masks/updates.py).
    update: str = "auto"


@dataclasses.dataclass
class EarlyStoppingConfig:
    """``early_stopping.*``: :class:`trainer.callbacks.StopOnPlateau` and ``BestWeights``."""

    monitor: Optional[str] = None  # None: off; else an epoch metric such as val_loss or val_accuracy
    patience: int = 3
    min_delta: float = 0.0
    restore_best_weights: bool = True
    save_best: bool = True


@dataclasses.dataclass
class SFTConfig:
    """Sparse fine-tuning (trainer/sft.py): which elements train, chosen before training."""

    method: Optional[str] = None      # null | fish | snip | random | magnitude | delta
    k: Any = 0.005                    # a fraction in (0, 1) of the selected elements, or an integer count
    batches: int = 8                  # fish / snip: batches of the training set
    batch_size: Optional[int] = None  # fish / snip: default trainer.batch_size
    select: List[str] = dataclasses.field(default_factory=lambda: ["*"])  # globs over variable paths
    exclude: List[str] = dataclasses.field(default_factory=list)
    ranking: str = "global"           # global | layerwise
    seed: int = 0                     # random
    dense_weights: Optional[str] = None  # delta (LT-SFT): the dense phase's weights.npz
    value: str = "current"            # current | zero: what the elements outside the top-k are pinned to


@dataclasses.dataclass
class DistributeConfig:
    """``distribute.*``: the ``tf.distribute`` strategy and logical CPU devices to split into."""

    strategy: str = "none"
    logical_cpu_devices: Optional[int] = None


@dataclasses.dataclass
class Config:
    """The whole run config (``config.yaml`` composes into it; ``data``, ``model``, ``optimizer`` are groups)."""

    name: str = "default"
    seed: int = 0
    dry_run: bool = False
    resume: Optional[str] = None
    optimized_metric: Optional[str] = None
    # Config keys (or key prefixes, or "*") a resume may change although they change the trajectory;
    # each accepted change is listed in report.json's config_changes.
    resume_allow_changes: List[str] = dataclasses.field(default_factory=list)
    data: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    freeze: FreezeConfig = dataclasses.field(default_factory=FreezeConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    early_stopping: EarlyStoppingConfig = dataclasses.field(default_factory=EarlyStoppingConfig)
    distribute: DistributeConfig = dataclasses.field(default_factory=DistributeConfig)


def register() -> None:
    """Registers the schema as ``schema`` (the first entry of ``config.yaml``'s defaults).

    Call it once before ``hydra.compose`` or ``@hydra.main`` (calling it again
    replaces the entry with the same schema).
    """
    ConfigStore.instance().store(name="schema", node=Config)


PRESET_HINT = "model.preset takes a directory written by backbone.save_to_preset(dir); null builds from model.backbone"
EARLY_STOPPING_MONITORS = ("val_loss", "val_accuracy", "loss", "accuracy", "val_perplexity", "perplexity")


class ConfigError(ValueError):
    """A config value is out of its allowed range or a key is unknown (raised before anything is built).

    Args:
      message: names the key and the bad value (the error's one line).
      hint: one line of advice (the nearest valid name, the valid names); ``None``: the general hint.
    """

    def __init__(self, message: str, hint: Optional[str] = None):
        super().__init__(message)
        self.hint = hint


def check_config(cfg: DictConfig) -> None:
    """Checks ranges the types cannot express.

    Every key must be one the schema (or the group's config file) declares:
    ``+trainer.epoch=5`` is refused, not ignored (:mod:`trainer.config_keys`);
    the optimizer needs a known name and hyper-parameters in range
    (:mod:`trainer.optimizer_config`).

    Raises:
      ConfigError: naming the key, the bad value and what is allowed (with a hint line).
    """
    from trainer.config_keys import unknown_key
    from trainer.optimizer_config import optimizer_problem

    for message, hint in (unknown_key(cfg, Config), optimizer_problem(cfg.optimizer)):
        if message:
            raise ConfigError(message, hint)
    t = cfg.trainer
    positive = {
        "trainer.epochs": t.epochs,
        "trainer.batch_size": t.batch_size,
        "trainer.eval_batch_size": t.eval_batch_size,
        "trainer.steps_per_execution": t.steps_per_execution,
        "trainer.checkpoint_every_n_steps": t.checkpoint_every_n_steps,
        "trainer.keep_checkpoints": t.keep_checkpoints,
        "log.summary_every_n_steps": cfg.log.summary_every_n_steps,
        "log.histogram_every_n_steps": cfg.log.histogram_every_n_steps,
    }
    for key, value in (("trainer.max_steps", t.max_steps), ("trainer.log_every_n_steps", t.log_every_n_steps)):
        if value is not None:
            positive[key] = value
    for key, value in positive.items():
        positive_int(key, value, error=ConfigError)
    if t.nan_policy not in NAN_POLICIES:
        policies = " or ".join([", ".join(repr(p) for p in NAN_POLICIES[:-1]), repr(NAN_POLICIES[-1])])
        raise ConfigError(f"trainer.nan_policy must be {policies}, got {t.nan_policy!r}")
    update = cfg.freeze["update"]  # item access: DictConfig.update is a method
    if update not in UPDATE_MODES:
        raise ConfigError(f"freeze.update must be one of {list(UPDATE_MODES)}, got {update!r}")
    if not is_whole(cfg.seed, 0):
        raise ConfigError(f"seed must be a non-negative integer, got {cfg.seed}")
    stopping = cfg.get("early_stopping") or {}
    if stopping.get("monitor") is not None and stopping["monitor"] not in EARLY_STOPPING_MONITORS:
        raise ConfigError(f"early_stopping.monitor must be null (off) or one of {list(EARLY_STOPPING_MONITORS)}, "
                          f"got {stopping['monitor']!r}")
    if not is_whole(stopping.get("patience", 0), 0):
        raise ConfigError(f"early_stopping.patience must be a non-negative integer, got {stopping['patience']}")
    lora_rank = cfg.model.get("lora_rank") if isinstance(cfg.get("model"), DictConfig) else None
    if lora_rank is not None and not is_whole(lora_rank, 1):
        raise ConfigError(f"model.lora_rank must be a positive integer or null, got {lora_rank!r}")
    model = cfg.get("model") if isinstance(cfg.get("model"), DictConfig) else {}
    data = cfg.get("data") if isinstance(cfg.get("data"), DictConfig) else {}
    if t.remat and model.get("name") != "causal_lm":
        raise ConfigError(f"trainer.remat=true needs transformer blocks to recompute: model={model.get('name')} has "
                          "none", "use model=causal_lm (a keras-hub decoder), or set trainer.remat=false")
    from trainer.causal_lm import PresetError, check_preset
    from trainer.text_data import TextDataError, check_text_options

    try:
        if model.get("name") == "causal_lm":
            check_preset(model.get("preset"))
        if data.get("name") == "text":
            check_text_options(**data)
    except (PresetError, TextDataError) as err:
        raise ConfigError(str(err), getattr(err, "hint", None) or PRESET_HINT) from None
    from trainer.sft import SFTConfigError, sft_options

    try:
        sft_options(cfg.get("sft"))
    except SFTConfigError as err:
        raise ConfigError(str(err)) from None


def known_keys(section: str) -> List[str]:
    """The field names of the ``trainer``, ``log`` or ``export`` section.

    Raises:
      KeyError: another section.
    """
    cls = {"trainer": TrainerConfig, "log": LogConfig, "export": ExportConfig}[section]
    return [f.name for f in dataclasses.fields(cls)]
