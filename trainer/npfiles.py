"""Reading user-supplied ``.npy`` / ``.npz`` files defensively.

A path from a config may name anything: a FIFO (``open`` would block
forever), a device (``/dev/zero``), a symlink to a text file, a ``.npy``
whose header claims 10^15 elements, or an archive holding pickled objects.
:func:`check_file` refuses every non-regular file without opening it (one
``os.stat``) and files over a size limit; :func:`load_npy` and
:class:`NpzReader` read the NumPy header first, refuse object dtypes and
headers that claim more bytes than the file holds, and never unpickle
(``allow_pickle=False``). Every refusal is one line naming the setting, the
file and what is allowed, raised as the caller's error class.
"""

from __future__ import annotations

import os
import stat
import zipfile
from typing import Dict, List, Optional, Tuple, Type

import numpy as np

__all__ = ["NpzReader", "check_file", "check_values", "load_npy", "path_is_npz"]

MAX_BYTES = 4 * 1024**3  # a user file larger than this (4 GiB) is refused before it is read
NPY_MAGIC = b"\x93NUMPY"
NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def check_file(path: str, what: str, error: Type[Exception] = ValueError, *, expected: str = "file",
               max_bytes: int = MAX_BYTES, made_by: Optional[str] = None) -> str:
    """Refuses a missing, non-regular or too large file, without opening it.

    Args:
      path: the path from the config (symlinks are followed).
      what: the setting's name for messages, e.g. ``"model.init_from"``.
      error: the exception class raised.
      expected: what to pass instead, for messages (``".npy file saved with np.save(path, array)"``).
      max_bytes: the size limit.
      made_by: the command that writes ``path`` (another run's output), named when the file is missing.

    Returns:
      ``path`` as a ``str``.

    Raises:
      error: the path is missing, a directory, a FIFO / device / socket, or
        larger than ``max_bytes``.
    """
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        fix = f"make it with: {made_by}" if made_by else f"pass the path of a {expected}"
        raise error(f"{what} {path!r} does not exist; {fix}") from None
    except OSError as err:
        raise error(f"{what} {path!r} cannot be read: {err.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{what} {path!r} is a directory, expected a {expected}")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path!r} is not a regular file (a FIFO, device or socket); pass a {expected}")
    if info.st_size > max_bytes:
        raise error(f"{what} {path!r} has {info.st_size:,} bytes, more than the limit of {max_bytes:,}")
    return path


def _header(stream, what: str, error: Type[Exception], expected: str) -> Tuple[tuple, np.dtype, int]:
    """Reads a ``.npy`` header from ``stream``; returns ``(shape, dtype, data_bytes)``."""
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(stream, max_header_size=100_000)
    except (ValueError, OSError, SyntaxError) as err:
        raise error(f"{what} has no valid .npy header ({str(err).splitlines()[0][:120]})") from None
    if dtype.hasobject:
        raise error(f"{what} could not be loaded without pickle: it holds Python objects (dtype {dtype}); "
                    f"save it with {_how(expected)} from a numeric array")
    count = 1
    for n in shape:
        count *= int(n)
    return tuple(shape), dtype, count * dtype.itemsize


def _how(expected: str) -> str:
    """``"np.save(path, array)"`` from ``".npy file saved with np.save(path, array)"``."""
    return expected.partition(" saved with ")[2] or expected


def _kind(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(6)
    if head == NPY_MAGIC:
        return "npy"
    if head[:4] in NPZ_MAGIC:
        return "npz"
    if head[:1] == b"\x80":
        return "pickle"
    return repr(head)


def path_is_npz(path: str) -> bool:
    """True when ``path`` starts with a zip signature (``np.savez`` output)."""
    return _kind(path) == "npz"


def _refuse_kind(kind: str, path: str, what: str, error: Type[Exception], expected: str) -> None:
    if kind == "pickle":
        raise error(f"{what} {path!r} could not be loaded without pickle: it is a Python pickle; "
                    f"save it with {_how(expected)}")
    found = {"npy": "a .npy file (one array)", "npz": "an .npz archive"}.get(kind, f"a file starting with {kind}")
    raise error(f"{what} {path!r} is {found}; expected a {expected}")


def load_npy(path: str, what: str, error: Type[Exception] = ValueError, *,
             expected: str = ".npy file saved with np.save(path, array)", max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Loads one array saved with ``np.save`` (checked as the module docstring says).

    Args:
      path, what, error, expected, max_bytes: as for :func:`check_file`.

    Raises:
      error: see :func:`check_file`; not a ``.npy`` file; object dtype; a
        header claiming more data than the file holds.
    """
    path = check_file(path, what, error, expected=expected, max_bytes=max_bytes)
    kind = _kind(path)
    if kind != "npy":
        _refuse_kind(kind, path, what, error, expected)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        shape, dtype, nbytes = _header(f, f"{what} {path!r}", error, expected)
        if nbytes > size - f.tell():
            raise error(f"{what} {path!r}: its header claims a {shape} {dtype} array ({nbytes:,} bytes) "
                        f"but the file has {size:,} bytes")
        f.seek(0)
        return np.load(f, allow_pickle=False)


class NpzReader:
    """An ``.npz`` archive opened for checked reads of single arrays (a context manager).

    Args:
      path: the archive (see :func:`check_file`).
      what: the setting's name for messages.
      error: the exception class raised.
      expected: what to pass instead, for messages.
      max_bytes: the limit for the file and for each array.
      made_by: the command that writes the archive (see :func:`check_file`).

    Raises:
      error: see :func:`check_file`, or the file is not a zip archive.
    """

    def __init__(self, path: str, what: str, error: Type[Exception] = ValueError, *,
                 expected: str = ".npz archive saved with np.savez(path, **arrays_by_variable_path) "
                                 "(a run's weights.npz)",
                 max_bytes: int = MAX_BYTES, made_by: Optional[str] = None):
        self.path = check_file(path, what, error, expected=expected, max_bytes=max_bytes, made_by=made_by)
        self.what, self.error, self.expected, self.max_bytes = what, error, expected, max_bytes
        kind = _kind(self.path)
        if kind != "npz":
            _refuse_kind(kind, self.path, what, error, expected)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as err:
            raise error(f"{what} {self.path!r} is not a readable .npz archive ({err})") from None
        self._members: Dict[str, zipfile.ZipInfo] = {
            info.filename[:-4]: info for info in self._zip.infolist() if info.filename.endswith(".npy")}

    @property
    def files(self) -> List[str]:
        """The array names (``weights.npz``: variable paths)."""
        return list(self._members)

    def header(self, name: str) -> Tuple[tuple, np.dtype]:
        """``(shape, dtype)`` of array ``name``, read from its header only."""
        with self._zip.open(self._members[name]) as stream:
            shape, dtype, _ = _header(stream, f"{self.what} {self.path!r} array {name!r}", self.error, self.expected)
        return shape, dtype

    def array(self, name: str) -> np.ndarray:
        """Array ``name``, after checking its header against the member's size and the limit."""
        info = self._members[name]
        where = f"{self.what} {self.path!r} array {name!r}"
        with self._zip.open(info) as stream:
            shape, dtype, nbytes = _header(stream, where, self.error, self.expected)
            if nbytes > min(info.file_size, self.max_bytes):
                raise self.error(f"{where}: its header claims a {shape} {dtype} array ({nbytes:,} bytes) but the "
                                 f"archive holds {info.file_size:,} bytes for it (limit {self.max_bytes:,})")
        try:
            with self._zip.open(info) as stream:
                return np.lib.format.read_array(stream, allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise self.error(f"{where} cannot be read ({str(err).splitlines()[0][:120]})") from None

    def close(self) -> None:
        """Closes the archive (``with NpzReader(...)`` does it on exit)."""
        self._zip.close()

    def __enter__(self) -> "NpzReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_values(name: str, value: np.ndarray, dtype: str, where: str,
                 error: Type[Exception] = ValueError) -> np.ndarray:
    """Converts ``value`` to ``dtype`` if it is numeric, finite and representable; else refuses.

    Args:
      name: the variable path (for messages).
      value: the array read from a file.
      dtype: the variable's dtype name, e.g. ``"float32"``.
      where: the setting and file, for messages.
      error: the exception class raised.

    Returns:
      ``value`` cast to ``dtype`` (bit-exact for same-dtype input).

    Raises:
      error: a non-numeric dtype (strings, bytes, objects), booleans for a
        non-boolean variable, a float array for an
        integer variable, NaN or infinity, or a value outside ``dtype``'s range.
    """
    target = np.dtype(dtype)
    if value.dtype.kind not in "biuf":
        raise error(f"{where}: {name!r} holds dtype {value.dtype}, expected numbers for a {target} variable")
    if value.dtype.kind == "b" and target.kind != "b":
        raise error(f"{where}: {name!r} holds booleans, expected numbers for a {target} variable")
    if target.kind in "biu" and value.dtype.kind == "f":
        raise error(f"{where}: {name!r} holds floats (dtype {value.dtype}) for an integer ({target}) variable")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        raise error(f"{where}: {name!r} holds {bad} non-finite values (NaN or infinity); only finite values "
                    "can initialize a variable")
    if target.kind == "f" and value.size:
        largest = float(np.max(np.abs(value.astype(np.float64))))
        if largest > float(np.finfo(target).max):
            raise error(f"{where}: {name!r} holds {largest:.6g}, beyond {target}'s largest value "
                        f"{float(np.finfo(target).max):.6g}")
    elif target.kind in "iu" and value.size:
        info = np.iinfo(target)
        low, high = int(value.min()), int(value.max())
        if low < info.min or high > info.max:
            raise error(f"{where}: {name!r} holds values in [{low}, {high}], outside {target}'s [{info.min}, {info.max}]")
    return value.astype(target, copy=False)

