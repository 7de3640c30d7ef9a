"""Devices, ``tf.distribute`` strategies and mixed precision for a run.

Scale-out is delegated to TensorFlow's own engine: ``MirroredStrategy`` (one
machine, several devices) and ``MultiWorkerMirroredStrategy`` (several
machines, configured by the ``TF_CONFIG`` environment variable). The train
step in ``trainer.loop`` reduces gradients across replicas, masks them after
that reduction, applies them and re-projects every replica's copy.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import keras
import tensorflow as tf

__all__ = ["DistributeError", "is_chief", "make_strategy", "set_precision", "split_cpu", "worker_dir", "wrap_optimizer"]

log = logging.getLogger("trainer")

STRATEGIES = ("none", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


class DistributeError(ValueError):
    """A distribution or precision setting cannot be honoured (raised before training)."""


def split_cpu(count: Optional[int]) -> None:
    """Splits the first CPU into ``count`` logical devices (for testing ``MirroredStrategy`` without GPUs).

    Must run before TensorFlow initializes its devices.

    Raises:
      DistributeError: TensorFlow's devices are already initialized with another count.
    """
    if not count or count <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(count))
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != count:
            raise DistributeError(
                f"distribute.logical_cpu_devices={count}: TensorFlow's devices were initialized already "
                f"with {have} CPU device(s); set it in a fresh process") from None


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy named ``none``, ``mirrored`` or ``multi_worker``.

    ``mirrored`` uses every GPU, else every logical CPU device. ``multi_worker``
    reads the cluster from ``TF_CONFIG``
    (``{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}``).

    Raises:
      DistributeError: an unknown name, or ``multi_worker`` without ``TF_CONFIG``.
    """
    if name not in STRATEGIES:
        raise DistributeError(f"distribute.strategy must be one of {list(STRATEGIES)}, got {name!r}")
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    config = os.environ.get("TF_CONFIG")
    if not config:
        raise DistributeError("distribute.strategy=multi_worker needs TF_CONFIG, e.g. "
                              '{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]}, '
                              '"task": {"type": "worker", "index": 0}}')
    try:
        json.loads(config)
    except ValueError as err:
        raise DistributeError(f"TF_CONFIG is not valid JSON: {err}") from None
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the process that writes the run directory (worker 0, or a single process)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


def worker_dir(run_dir: str, strategy: tf.distribute.Strategy) -> str:
    """The chief writes ``run_dir``; every other worker its own ``run_dir/worker_<i>``."""
    if is_chief(strategy):
        return run_dir
    return os.path.join(run_dir, f"worker_{strategy.cluster_resolver.task_id}")


def set_precision(policy: Optional[str]) -> None:
    """Sets Keras' global dtype policy (``float32``, ``mixed_float16`` or ``mixed_bfloat16``).

    Variables stay float32 under the mixed policies; only computations change.

    Raises:
      DistributeError: an unknown policy.
    """
    policy = policy or "float32"
    if policy not in PRECISIONS:
        raise DistributeError(f"trainer.mixed_precision must be one of {list(PRECISIONS)}, got {policy!r}")
    keras.mixed_precision.set_global_policy(policy)


def wrap_optimizer(optimizer: keras.optimizers.Optimizer, policy: Optional[str]) -> keras.optimizers.Optimizer:
    """Wraps the optimizer in Keras' ``LossScaleOptimizer`` for ``mixed_float16`` (dynamic loss scaling)."""
    if policy == "mixed_float16" and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
