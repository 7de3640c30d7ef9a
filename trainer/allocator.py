"""The process's CPU memory allocation for large models (``trainer.low_memory_allocator``).

Two process-wide settings decide how much resident memory a large model's
steps keep on a CPU (measured in ``docs/llm_scale.md``, "The allocator"):

1. **oneDNN's tensors from ``malloc``.** TensorFlow on x86 runs oneDNN
   kernels (with a native bfloat16 matrix product: without them a bfloat16
   ``MatMul`` converts its kernel to float32 copies, about 2.5 times the
   kernel's bytes, at every call). By default oneDNN's tensors come from a
   best-fit pool that never gives a region back to the system.
   ``TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1`` keeps the kernels and takes the
   tensors from ``malloc``. TensorFlow reads it when it creates its CPU
   device, so it must be set before the process's first TensorFlow op.
2. **glibc's mmap threshold, fixed.** glibc serves a request of at least
   ``M_MMAP_THRESHOLD`` bytes with its own ``mmap``, returned to the system
   when freed; but each such free raises the threshold (up to 32 MiB on
   64-bit), so the weight-sized temporaries of later steps come from the
   heap and stay resident after they are freed. ``mallopt(M_MMAP_THRESHOLD,
   n)`` fixes the threshold at ``n`` and turns that adjustment off
   (``man 3 mallopt``). It can be set at any time; it applies to later
   requests.

Measured on a 1.1B-parameter Llama-shape decoder (bfloat16, without XLA),
both together lowered the peak RSS of the trainer and of keras-hub LoRA
alike; each ``mmap``'d request costs a system call and page faults, so steps
can be slower (the numbers are in the doc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Dict

__all__ = ["AllocatorError", "DEFAULT_MMAP_THRESHOLD", "SYSTEM_ALLOCATOR_ENV", "low_memory_allocator"]

SYSTEM_ALLOCATOR_ENV = "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"
DEFAULT_MMAP_THRESHOLD = 256 * 1024  # bytes: of 256 KiB and 4 MiB, measured, 256 KiB kept less
_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h> parameter number
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit (man 3 mallopt)


class AllocatorError(RuntimeError):
    """The allocator cannot be set as asked (too late in the process, or no glibc ``mallopt``)."""


def _devices_initialized() -> bool:
    """Whether TensorFlow has created its devices (and read its allocator settings) in this process."""
    if "tensorflow" not in sys.modules:
        return False
    from tensorflow.python.eager import context

    return context.context()._context_handle is not None


def low_memory_allocator(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> Dict[str, int]:
    """Sets both settings of the module doc for this process; call it before the first TensorFlow op.

    Args:
      mmap_threshold: bytes (int, 4,096 to 33,554,432): requests of at least
        this size get their own ``mmap`` and go back to the system when freed.

    Returns:
      ``{"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": 1, "mmap_threshold": mmap_threshold}``: what was set.

    Raises:
      AllocatorError: TensorFlow's devices already exist in this process (the
        oneDNN setting would be ignored), the C library has no ``mallopt``
        (not glibc), or ``mallopt`` refused the value.
      ValueError: ``mmap_threshold`` outside the range above.
    """
    if isinstance(mmap_threshold, bool) or not isinstance(mmap_threshold, int) or not (
            4096 <= mmap_threshold <= _MAX_MMAP_THRESHOLD):
        raise ValueError(f"mmap_threshold={mmap_threshold!r}: give a number of bytes from 4096 to "
                         f"{_MAX_MMAP_THRESHOLD} (default {DEFAULT_MMAP_THRESHOLD})")
    if _devices_initialized() and os.environ.get(SYSTEM_ALLOCATOR_ENV) != "1":
        raise AllocatorError("low_memory_allocator: TensorFlow's devices already exist in this process, so "
                             f"{SYSTEM_ALLOCATOR_ENV}=1 would be ignored; call it before the first TensorFlow op "
                             "(or set the variable in the environment)")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        raise AllocatorError("low_memory_allocator: this C library has no mallopt (glibc's); the mmap threshold "
                             "cannot be fixed here")
    if mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(mmap_threshold)) != 1:
        raise AllocatorError(f"low_memory_allocator: mallopt(M_MMAP_THRESHOLD, {mmap_threshold}) was refused")
    os.environ[SYSTEM_ALLOCATOR_ENV] = "1"
    return {SYSTEM_ALLOCATOR_ENV: 1, "mmap_threshold": mmap_threshold}
