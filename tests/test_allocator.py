"""trainer.allocator.low_memory_allocator: what it sets, what it refuses (glibc's mallopt, TensorFlow's devices)."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from trainer.allocator import SYSTEM_ALLOCATOR_ENV, AllocatorError, low_memory_allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Frees a 1 MiB malloc block, then asks for another: glibc's default raises its mmap threshold on that free, so
# the second block comes from the heap (no new mmap'd block); with the threshold fixed, it is mmap'd again.
PROBE = r"""
import ctypes, importlib.util, json, os, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
set_ = None
if sys.argv[2] == "on":
    spec = importlib.util.spec_from_file_location("allocator", sys.argv[1])  # the module alone: no TensorFlow import
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)
    set_ = allocator.low_memory_allocator()
libc.free(libc.malloc(1 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
mapped = libc.mallinfo2().hblks - before
libc.free(block)
env = os.environ.get("TF_ONEDNN_USE_SYSTEM_ALLOCATOR")
print(json.dumps({"set": set_, "mapped": mapped, "env": env}))
"""


def _probe(mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != SYSTEM_ALLOCATOR_ENV}
    module = os.path.join(REPO, "trainer", "allocator.py")
    out = subprocess.run([sys.executable, "-c", PROBE, module, mode], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fixed_threshold_maps_a_block_that_glibc_default_takes_from_the_heap():
    on, off = _probe("on"), _probe("off")
    assert on == {"set": {SYSTEM_ALLOCATOR_ENV: 1, "mmap_threshold": 262144}, "mapped": 1, "env": "1"}
    assert off == {"set": None, "mapped": 0, "env": None}


def test_refused_after_tensorflow_created_its_devices(monkeypatch):
    tf.constant(1.0) + 1.0  # this test process has its devices
    monkeypatch.delenv(SYSTEM_ALLOCATOR_ENV, raising=False)
    with pytest.raises(AllocatorError) as err:
        low_memory_allocator()
    assert str(err.value) == (
        "low_memory_allocator: TensorFlow's devices already exist in this process, so "
        "TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 would be ignored; call it before the first TensorFlow op "
        "(or set the variable in the environment)")
    assert SYSTEM_ALLOCATOR_ENV not in os.environ


@pytest.mark.parametrize("bad", [100, 1 << 26, True, 262144.0])
def test_bad_threshold_named(bad):
    with pytest.raises(ValueError) as err:
        low_memory_allocator(bad)
    assert str(err.value) == (f"mmap_threshold={bad!r}: give a number of bytes from 4096 to 33554432 "
                              "(default 262144)")


def test_run_refuses_before_touching_its_directory(tmp_path, monkeypatch):
    from tests.test_causal_lm import compose_cfg
    from trainer.run import run

    tf.constant(1.0) + 1.0
    monkeypatch.delenv(SYSTEM_ALLOCATOR_ENV, raising=False)
    run_dir = tmp_path / "run"
    with pytest.raises(AllocatorError, match="^low_memory_allocator: TensorFlow's devices already exist"):
        run(compose_cfg(["trainer.low_memory_allocator=true", "trainer.epochs=1"]), run_dir=str(run_dir))
    assert not run_dir.exists()
