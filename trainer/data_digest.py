"""A digest of the data a run reads, kept in its fingerprint: a resume on other data is refused like a changed config.

The config names the data (``data.name``, ``data.path``) but not its
content: ``TRAINER_DATA_DIR`` may point at another ``mnist.npz``, or the file
at ``data.path`` may be replaced between two segments of a run. The
fingerprint (:func:`trainer.rundir.fingerprint`) therefore also holds
``data.digest.bytes`` and ``data.digest.sha256`` of the file the loader
reads (:func:`trainer.data.resolve_mnist_path`; for ``digits``,
scikit-learn's bundled ``digits.csv.gz``).

Cost: one ``os.stat`` and one SHA-256 pass over the file's bytes, read in
1 MiB blocks: about 30 ms for MNIST's 11 MB file, under 1 ms for digits'
57 KB, once per process (cached by path, size and modification time).
MNIST downloaded by Keras (no ``data.path``, no ``TRAINER_DATA_DIR``) has no
file to hash beforehand: its digest says so (``data.digest.file``) and is
not compared.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["DIGEST_PREFIX", "comparable", "data_digest", "file_digest"]

DIGEST_PREFIX = "data.digest."
DOWNLOADED = "keras.datasets.mnist download (not hashed)"


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str) -> Dict[str, Any]:
    """``{"data.digest.bytes": size, "data.digest.sha256": hex}`` of a regular file (see the module's cost note).

    Raises:
      OSError: the file cannot be read.
    """
    stat = os.stat(path)
    return {DIGEST_PREFIX + "bytes": int(stat.st_size),
            DIGEST_PREFIX + "sha256": _sha256(os.path.abspath(path), int(stat.st_size), int(stat.st_mtime_ns))}


def _data_file(data: Mapping[str, Any]) -> Optional[str]:
    from trainer.data import resolve_mnist_path

    if data.get("name") == "mnist":
        return resolve_mnist_path(data.get("path"))
    if data.get("name") == "digits":
        import sklearn.datasets

        return os.path.join(os.path.dirname(sklearn.datasets.__file__), "data", "digits.csv.gz")
    return None


def data_digest(data: Mapping[str, Any]) -> Dict[str, Any]:
    """The digest keys of the fingerprint for a ``data`` config block (a plain mapping).

    Args:
      data: the resolved ``data`` block (``name``, optional ``path``).

    Returns:
      :func:`file_digest` of the file the loader reads, or
      ``{"data.digest.file": "keras.datasets.mnist download (not hashed)"}``
      when MNIST is to be downloaded; ``{}`` for an unknown ``data.name``
      (:func:`trainer.run.load_data` refuses it).

    Raises:
      DataError: ``data.path`` / ``TRAINER_DATA_DIR`` name no readable file
        (:func:`trainer.data.resolve_mnist_path`).
    """
    if data.get("name") not in ("mnist", "digits"):
        return {}
    path = _data_file(data)
    return {DIGEST_PREFIX + "file": DOWNLOADED} if path is None else file_digest(path)


def comparable(old: Dict[str, Any], new: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Both fingerprints without their digest keys when one side has no hash to compare.

    A checkpoint written before the digest existed, a downloaded MNIST, and
    the config-only fingerprint of ``resume=true``'s search
    (:func:`trainer.resume.compose_fingerprint`) have no ``sha256``: the data
    is then checked by its config keys alone.
    """
    key = DIGEST_PREFIX + "sha256"
    if key in old and key in new:
        return old, new

    def strip(fingerprint):
        return {k: v for k, v in fingerprint.items() if not k.startswith(DIGEST_PREFIX)}

    return strip(old), strip(new)
