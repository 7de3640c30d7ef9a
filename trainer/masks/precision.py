"""Float32 master values for a reduced-precision (bfloat16 / float16) base.

An optimizer step of a fine-tune (``AdamW(1e-4)``) is far below the
resolution of bfloat16 (8 significant bits): applied to a bfloat16 variable it
rounds back to the old value and training silently does nothing. So a
compactly updated variable whose dtype is ``bfloat16`` or ``float16`` keeps
its ``k`` trainable values (and hence the optimizer's ``[k]`` slots) in
float32, the *master* values; after each update the trainable elements are
written into the model variable rounded to its dtype, and frozen elements are
never written (they keep their bit patterns in the variable's dtype).

A dense update has no room for masters (it would need a float32 copy of the
whole variable), so it is refused for such variables with one line that
points to ``update="compact"``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import tensorflow as tf

from trainer.masks.errors import FreezeConfigError

REDUCED = ("bfloat16", "float16")
MASTER = "float32"


def dtype_name(dtype: Any) -> str:
    """The name of a TensorFlow, NumPy or Keras dtype (``"bfloat16"``, ``"float32"``...)."""
    return tf.as_dtype(dtype).name


def is_reduced(dtype: Any) -> bool:
    """True for ``bfloat16`` and ``float16``: the dtypes whose compact values are float32 masters."""
    return dtype_name(dtype) in REDUCED


def master_dtype(dtype: Any) -> str:
    """The dtype of the compact ``[k]`` values (and optimizer slots) of a variable of ``dtype``.

    ``float32`` for ``bfloat16`` / ``float16``; the variable's own dtype otherwise.
    """
    return MASTER if is_reduced(dtype) else dtype_name(dtype)


def _bits(x: tf.Tensor) -> tf.Tensor:
    unsigned = {1: tf.uint8, 2: tf.uint16, 4: tf.uint32, 8: tf.uint64}[x.dtype.size]
    return tf.bitcast(x, unsigned)


def refreshed(masters: tf.Tensor, current: tf.Tensor) -> tf.Tensor:
    """The compact values after reading the model variable: ``masters`` where the variable still holds them.

    An element keeps its master value where the model variable holds exactly
    (bit for bit) the master rounded to the variable's dtype, i.e. nothing
    wrote it since the last update; elsewhere (a ``set_weights``, a regrown
    element) the variable's value, widened, is taken. Usable in a ``tf.function``.

    Args:
      masters: ``[k]`` values in the master dtype (or in the variable's dtype: then it is ``current``).
      current: ``[k]`` values gathered from the model variable.

    Returns:
      ``[k]`` values of ``masters``' dtype.
    """
    if masters.dtype == current.dtype:
        return current
    same = tf.equal(_bits(tf.cast(masters, current.dtype)), _bits(current))
    return tf.where(same, masters, tf.cast(current, masters.dtype))


def check_mode(path: str, dtype: Any, mode: str) -> None:
    """Refuses a dense update of a reduced-precision variable (its steps would round away).

    Raises:
      FreezeConfigError: ``mode`` is ``"dense"`` and ``dtype`` is bfloat16 or float16.
    """
    if mode == "dense" and is_reduced(dtype):
        raise FreezeConfigError(
            f"variable {path!r} is {dtype_name(dtype)}: a dense update would round every step away (training "
            "would silently do nothing); use update='compact' (float32 master values), with masks that do not "
            "change during training")


def precision(variable_dtype: Any, values_dtype: Optional[Any]) -> Optional[Dict[str, str]]:
    """What a plan row says of a variable's precision, or ``None`` where every part has the variable's dtype.

    Returns:
      ``{"variable": ..., "values": ..., "slots": ...}`` (dtype names) when the
      compact values and optimizer slots are masters of another dtype.
    """
    if values_dtype is None or dtype_name(values_dtype) == dtype_name(variable_dtype):
        return None
    return {"variable": dtype_name(variable_dtype), "values": dtype_name(values_dtype),
            "slots": dtype_name(values_dtype)}


def label(row_precision: Optional[Dict[str, str]]) -> str:
    """The words ``describe`` appends to the update mode: ``" (bfloat16 base, float32 masters)"`` or ``""``."""
    if not row_precision:
        return ""
    return f" ({row_precision['variable']} base, {row_precision['values']} masters)"

