"""load_sparse_weights reads through trainer.npfiles: every refusal is one line naming the file, the array and the rule.

Each case is a file that today's np.load-based reader hung on, dropped silently, allocated for or failed on with a
raw NumPy error; the table holds the exact message.
"""

import os
import threading
import zipfile

import numpy as np
import pytest

from trainer.sparse_export import load_sparse_weights, write_sparse_weights

GOOD = {"k:indices": np.array([0, 3], np.int32), "k:values": np.array([1.5, -2.0], np.float32),
        "k:shape": np.array([2, 2]), "b": np.zeros(2, np.float32)}
EXPECTED = ".npz archive saved with trainer.sparse_export.write_sparse_weights (export.sparse=true)"


def replaced(**arrays):
    out = {**GOOD, **arrays}
    return {k: v for k, v in out.items() if v is not None}


CASES = {  # name: (arrays of the archive, the message after "sparse weights '<file>'")
    "no shape": (replaced(**{"k:shape": None}),
                 ": 'k' has no 'k:shape'; a sparse variable needs <path>:indices, <path>:values and <path>:shape"),
    "no values or shape": (replaced(**{"k:shape": None, "k:values": None}),
                           ": 'k' has no 'k:values' or 'k:shape'; a sparse variable needs <path>:indices, "
                           "<path>:values and <path>:shape"),
    "float indices": (replaced(**{"k:indices": np.array([0.0, 3.0])}),
                      " array 'k:indices' must be a 1-D array of integers (flat row-major element indices), got a "
                      "(2,) float64 array"),
    "bool indices": (replaced(**{"k:indices": np.array([True, False])}),
                     " array 'k:indices' must be a 1-D array of integers (flat row-major element indices), got a "
                     "(2,) bool array"),
    "2-D indices": (replaced(**{"k:indices": np.array([[0, 3]])}),
                    " array 'k:indices' must be a 1-D array of integers (flat row-major element indices), got a "
                    "(1, 2) int64 array"),
    "repeated indices": (replaced(**{"k:indices": np.array([3, 3], np.int32)}),
                         " array 'k:indices' holds index 3 more than once (1 indices repeated); each element is "
                         "stored at most once"),
    "index past the end": (replaced(**{"k:indices": np.array([0, 4], np.int32)}),
                           " array 'k:indices' holds indices in [0, 4], outside [0, 4) for shape (2, 2)"),
    "negative index": (replaced(**{"k:indices": np.array([-1, 2], np.int64)}),
                       " array 'k:indices' holds indices in [-1, 2], outside [0, 4) for shape (2, 2)"),
    "more indices than elements": (replaced(**{"k:indices": np.arange(5), "k:values": np.ones(5, np.float32)}),
                                   " array 'k:indices' holds 5 indices for a (2, 2) array of 4 elements; each "
                                   "element is stored at most once"),
    "fewer values": (replaced(**{"k:values": np.array([1.0], np.float32)}),
                     ": 'k' has 2 indices but 1 values; they must pair one to one"),
    "float shape": (replaced(**{"k:shape": np.array([2.0, 2.0])}),
                    " array 'k:shape' must be a 1-D array of non-negative integers (the variable's shape), got a "
                    "(2,) float64 array"),
    "2-D shape": (replaced(**{"k:shape": np.array([[2, 2]])}),
                  " array 'k:shape' must be a 1-D array of non-negative integers (the variable's shape), got a "
                  "(1, 2) int64 array"),
    "negative shape": (replaced(**{"k:shape": np.array([-2, -2])}),
                       " array 'k:shape' must hold non-negative integers, got [-2, -2]"),
    "string values": (replaced(**{"k:values": np.array(["a", "b"])}),
                      " array 'k:values' must be a 1-D array of numbers, got a (2,) <U1 array"),
    "4 TiB from a small file": (replaced(**{"k:shape": np.array([2**20, 2**20])}),
                                ": 'k' would be a (1048576, 1048576) float32 array (4,398,046,511,104 bytes); the "
                                "arrays loaded may hold 4,294,967,296 bytes together (max_bytes)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_archive_is_refused_in_one_line(tmp_path, case):
    arrays, message = CASES[case]
    path = str(tmp_path / "sparse_weights.npz")
    np.savez(path, **arrays)
    with pytest.raises(ValueError) as info:
        load_sparse_weights(path)
    assert str(info.value) == f"sparse weights {path!r}{message}"


def test_the_good_archive_loads_bit_exactly(tmp_path):
    path = str(tmp_path / "sparse_weights.npz")
    np.savez(path, **GOOD)
    loaded = load_sparse_weights(path)
    assert list(loaded) == ["b", "k"]
    np.testing.assert_array_equal(loaded["k"], np.array([[1.5, 0.0], [0.0, -2.0]], np.float32))
    weights = {"w": np.array([[-0.0, 0.0], [np.nan, 3.0]], np.float32), "s": np.float32(2.5)}
    write_sparse_weights(weights, ["w", "s"], path)
    loaded = load_sparse_weights(path)
    assert loaded["w"].tobytes() == weights["w"].tobytes() and loaded["s"].shape == () and loaded["s"] == 2.5


def test_files_that_are_not_sparse_weights_are_named(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "pickle.npz").write_bytes(b"\x80\x04K\x01.")
    expected = {
        "a.npy": f"is a .npy file (one array); expected a {EXPECTED}",
        "notes.txt": f"is a file starting with b'hello'; expected a {EXPECTED}",
        "pickle.npz": ("could not be loaded without pickle: it is a Python pickle; save it with "
                       "trainer.sparse_export.write_sparse_weights (export.sparse=true)"),
        "missing.npz": f"does not exist; pass the path of a {EXPECTED}",
        ".": f"is a directory, expected a {EXPECTED}",
    }
    for name, message in expected.items():
        path = str(tmp_path / name) if name != "." else str(tmp_path)
        with pytest.raises(ValueError) as info:
            load_sparse_weights(path)
        assert str(info.value) == f"sparse weights {path!r} {message}", name


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    fifo = str(tmp_path / "sparse_weights.npz")
    os.mkfifo(fifo)
    errors = []
    reader = threading.Thread(target=lambda: errors.append(_error(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # blocked in open(): let it go before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_sparse_weights blocked on a FIFO")
    assert errors == [f"sparse weights {fifo!r} is not a regular file (a FIFO, device or socket); pass a {EXPECTED}"]


def _error(path):
    try:
        load_sparse_weights(path)
    except ValueError as err:
        return str(err)
    return None


def test_sizes_are_bounded_before_anything_is_allocated(tmp_path):
    small = str(tmp_path / "small.npz")
    np.savez(small, **GOOD)
    with pytest.raises(ValueError) as info:
        load_sparse_weights(small, max_bytes=100)
    assert str(info.value) == (f"sparse weights {small!r} has {os.path.getsize(small):,} bytes, more than the limit "
                               "of 100")
    bomb = str(tmp_path / "bomb.npz")  # 80 MB of zeros compress to a few KB
    np.savez_compressed(bomb, b=np.zeros(10**7))
    with pytest.raises(ValueError) as info:
        load_sparse_weights(bomb, max_bytes=10**6)
    assert str(info.value) == (f"sparse weights {bomb!r}: 'b' would be a (10000000,) float64 array (80,000,000 "
                               "bytes); the arrays loaded may hold 1,000,000 bytes together (max_bytes)")
    lying = str(tmp_path / "lying.npz")  # a member whose header claims 800 MB that the archive does not hold
    header = np.lib.format.header_data_from_array_1_0(np.zeros(3))
    header["shape"] = (10**8,)
    with zipfile.ZipFile(lying, "w") as archive, archive.open("b.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)
        member.write(np.zeros(3).tobytes())
    with pytest.raises(ValueError) as info:
        load_sparse_weights(lying)
    assert str(info.value) == (f"sparse weights {lying!r} array 'b': its header claims a (100000000,) float64 array "
                               "(800,000,000 bytes) but the archive holds 152 bytes for it (limit 4,294,967,296)")
