"""Text corpora for causal language models: files -> tokens -> fixed-length next-token sequences (no masks here).

The default corpus is the Python standard library's own ``.py`` sources
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages``), present on
every machine with Python, so a run needs no download; ``data.path`` names a
text file or a directory instead. Files are matched by ``include`` /
``exclude`` globs over their path relative to the root (``fnmatch``: ``*``
crosses ``/``), taken in a fixed order (SHA-256 of the relative path) until
``max_bytes``, so a cap samples the whole tree and two runs read
the same files. Text is tokenized by keras-hub's byte-level tokenizer
(``keras_hub.tokenizers.ByteTokenizer``: 256 ids, one per UTF-8 byte) or by a
tokenizer preset directory (``keras_hub.tokenizers.Tokenizer.from_preset``).

Each file becomes windows of ``sequence_length + 1`` tokens (stride
``sequence_length``): inputs are a window's first ``L`` tokens, labels the
next ``L``. A file's last window is right-padded with the pad id (byte
tokenizer: 0, the NUL byte, removed from the text beforehand); the loss
(:func:`objectives`) ignores pad labels, so every mean and the perplexity are
over real tokens only. Files are split into train / validation / test by a
hash of their relative path (documents, not windows, so no file is in two
splits); with fewer than ``MIN_FILES_TO_SPLIT_BY_FILE`` files, the windows
are split instead (the last ones go to validation and test).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import sysconfig
from typing import List, Optional, Sequence, Tuple

import numpy as np

from trainer.data import DataError, Splits

__all__ = ["STDLIB_SKIP", "TextDataError", "TextSplits", "check_text_options", "corpus_files", "load_text",
           "objectives", "text_tokenizer", "windows"]

STDLIB_SKIP = ("site-packages/*", "dist-packages/*")  # third-party code is not the standard library
MIN_FILES_TO_SPLIT_BY_FILE = 10


class TextDataError(DataError):
    """A text corpus or tokenizer that cannot be used (raised before training); ``hint`` says what to pass."""

    hint = ("data=text reads the standard library's sources by default; data.path takes a text file or a "
            "directory, data.tokenizer a tokenizer preset directory (or null for bytes)")


@dataclasses.dataclass
class TextSplits(Splits):
    """:class:`~trainer.data.Splits` of next-token sequences.

    ``x_*`` are int32 token ids ``(N, sequence_length)``, ``y_*`` int32 next
    tokens of the same shape (``pad_id`` where padded); ``num_classes`` is
    the vocabulary size.

    Attributes:
      pad_id: the padding id of inputs and labels (ignored by the loss).
      tokenizer: ``"byte"`` or the tokenizer preset directory.
      files: the files read; tokens: the real (non-pad) label tokens over all splits.
    """

    pad_id: int = 0
    tokenizer: str = "byte"
    files: int = 0
    tokens: int = 0


def corpus_files(path: Optional[str], include: Sequence[str] = ("*.py",),
                 exclude: Sequence[str] = ()) -> Tuple[str, List[str]]:
    """The corpus root and its matching files, relative to the root, in the fixed order (see the module doc).

    Args:
      path: a text file, a directory, or ``None`` for the standard library's sources.
      include: globs a file's relative path must match (one of them); a single file is always taken.
      exclude: globs that drop a file (with ``path=None`` also :data:`STDLIB_SKIP`).

    Returns:
      ``(root, [relative paths])``.

    Raises:
      TextDataError: ``path`` does not exist, or no file matches.
    """
    if path is not None and os.path.isfile(os.path.expanduser(str(path))):
        full = os.path.abspath(os.path.expanduser(str(path)))
        return os.path.dirname(full), [os.path.basename(full)]
    root = sysconfig.get_paths()["stdlib"] if path is None else os.path.expanduser(str(path))
    if not os.path.isdir(root):
        raise TextDataError(f"data.path={path!r} is neither a file nor a directory; pass a text file, a directory "
                            "of text files, or null for the standard library's sources")
    skip = list(exclude) + (list(STDLIB_SKIP) if path is None else [])
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(directory, name), root)
            if any(fnmatch.fnmatchcase(rel, g) for g in include) and not any(fnmatch.fnmatchcase(rel, g) for g in skip):
                found.append(rel)
    if not found:
        raise TextDataError(f"data.path={path if path is not None else root!r}: no file matches data.include="
                            f"{list(include)} minus data.exclude={list(exclude)}")
    return root, sorted(found, key=lambda rel: _unit("order", rel))


def _unit(purpose: str, rel: str) -> float:
    """A number in [0, 1) fixed by ``purpose`` and a relative path (SHA-256; independent across purposes)."""
    return int(hashlib.sha256(f"{purpose}:{rel}".encode()).hexdigest()[:12], 16) / 16 ** 12


def text_tokenizer(preset: Optional[str]):
    """``(tokenizer, vocabulary_size, pad_id)``: keras-hub's ``ByteTokenizer`` (``None``) or a preset directory's.

    Raises:
      TextDataError: ``preset`` is not a directory holding ``tokenizer.json`` (nothing is downloaded).
    """
    import keras_hub

    if preset is None:
        return keras_hub.tokenizers.ByteTokenizer(), 256, 0
    check_text_options(tokenizer=preset)
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(os.path.expanduser(str(preset)))
    pad = getattr(tokenizer, "pad_token_id", None)
    return tokenizer, int(tokenizer.vocabulary_size()), int(pad) if pad is not None else 0


def windows(tokens: np.ndarray, length: int, pad_id: int) -> Tuple[np.ndarray, np.ndarray]:
    """One document's next-token windows: inputs and labels, int32 ``(W, length)``, the last right-padded.

    Window ``w`` holds tokens ``[w * length, (w + 1) * length)`` as inputs and
    the same shifted by one as labels; a document of ``n`` tokens gives
    ``ceil((n - 1) / length)`` windows (none when ``n < 2``).
    """
    n = len(tokens)
    count = -(-(n - 1) // length) if n > 1 else 0
    padded = np.full(count * length + 1, pad_id, np.int32)
    padded[:n] = tokens[:count * length + 1]
    x = padded[:-1].reshape(count, length)
    y = padded[1:].reshape(count, length)
    return x, y


def _stack(parts: List[Tuple[np.ndarray, np.ndarray]], length: int) -> Tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros((0, length), np.int32), np.zeros((0, length), np.int32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def check_text_options(*, path: Optional[str] = None, sequence_length: int = 128, max_bytes: Optional[int] = None,
                       validation_fraction: float = 0.1, test_fraction: float = 0.1, tokenizer: Optional[str] = None,
                       **_) -> None:
    """Checks ``data=text`` values without reading the corpus (also run by :func:`trainer.config.check_config`).

    Raises:
      TextDataError: one line naming the bad value and what is allowed: a ``path`` that is neither a file nor a
        directory, a ``tokenizer`` that is not a local preset directory, a length, cap or fraction out of range.
    """
    if path is not None and not os.path.exists(os.path.expanduser(str(path))):
        raise TextDataError(f"data.path={path!r} is neither a file nor a directory; pass a text file, a directory "
                            "of text files, or null for the standard library's sources")
    if tokenizer is not None and not os.path.isfile(os.path.join(os.path.expanduser(str(tokenizer)),
                                                                 "tokenizer.json")):
        raise TextDataError(f"data.tokenizer={tokenizer!r} is not a local tokenizer preset directory; presets cannot "
                            "be downloaded here: pass the path of a directory saved with "
                            "tokenizer.save_to_preset(dir) (holding tokenizer.json), or null for bytes")
    if not isinstance(sequence_length, int) or sequence_length < 2:
        raise TextDataError(f"data.sequence_length must be an integer >= 2, got {sequence_length!r}")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
        raise TextDataError(f"data.max_bytes must be a positive integer or null (every file), got {max_bytes!r}")
    for key, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise TextDataError(f"data.{key} must be a fraction in [0, 1), got {value!r}")
    if validation_fraction + test_fraction >= 1:
        raise TextDataError(f"data.validation_fraction + data.test_fraction must be < 1, got "
                            f"{validation_fraction} + {test_fraction}")


def load_text(path: Optional[str] = None, *, include: Sequence[str] = ("*.py",), exclude: Sequence[str] = (),
              sequence_length: int = 128, max_bytes: Optional[int] = 2_000_000, validation_fraction: float = 0.1,
              test_fraction: float = 0.1, tokenizer: Optional[str] = None) -> TextSplits:
    """Reads, tokenizes and splits a text corpus into next-token sequences (see the module doc).

    Args:
      path: a text file, a directory, or ``None`` (the standard library's sources).
      include, exclude: globs over relative paths (:func:`corpus_files`).
      sequence_length: tokens per sequence ``L``, at least 2.
      max_bytes: read at most this many characters, the last file cut there (``None``: every file).
      validation_fraction, test_fraction: the shares of files (or windows) held out, each in [0, 1), sum < 1.
      tokenizer: a tokenizer preset directory, or ``None`` for keras-hub's ``ByteTokenizer``.

    Returns:
      :class:`TextSplits`: int32 ``(N, L)`` inputs and labels per split, ``num_classes`` the vocabulary.

    Raises:
      TextDataError: a bad value (named, with what is allowed), no file, or no training sequence.
    """
    check_text_options(path=path, sequence_length=sequence_length, max_bytes=max_bytes,
                       validation_fraction=validation_fraction, test_fraction=test_fraction, tokenizer=tokenizer)
    tok, vocabulary, pad_id = text_tokenizer(tokenizer)
    root, names = corpus_files(path, include, exclude)
    texts, read = [], 0
    for rel in names:
        with open(os.path.join(root, rel), "rb") as f:
            text = f.read().decode("utf-8", errors="replace").replace("\0", "")
        texts.append((rel, text if max_bytes is None else text[:max_bytes - read]))  # the last file is cut at the cap
        read += len(texts[-1][1])
        if max_bytes is not None and read >= max_bytes:
            break
    ids = tok.tokenize([t for _, t in texts])
    docs = [np.asarray(row, np.int32) for row in (ids.to_list() if hasattr(ids, "to_list") else ids)]
    by_file = len(docs) >= MIN_FILES_TO_SPLIT_BY_FILE
    split = [[], [], []]  # train, validation, test
    for (rel, _), tokens in zip(texts, docs):
        pair = windows(tokens, sequence_length, pad_id)
        u = _unit("split", rel)
        split[0 if not by_file else 2 if u < test_fraction else 1 if u < test_fraction + validation_fraction
              else 0].append(pair)
    arrays = [_stack(part, sequence_length) for part in split]
    by_file = by_file and all(len(arrays[i][0]) for i, f in ((1, validation_fraction), (2, test_fraction)) if f)
    if not by_file:  # too few files (or a held-out split got none): the last windows are held out
        x, y = _stack([pair for part in split for pair in part], sequence_length)
        n_test, n_val = int(round(len(x) * test_fraction)), int(round(len(x) * validation_fraction))
        cut = len(x) - n_test - n_val
        arrays = [(x[:cut], y[:cut]), (x[cut:cut + n_val], y[cut:cut + n_val]), (x[cut + n_val:], y[cut + n_val:])]
    if len(arrays[0][0]) == 0:
        raise TextDataError(f"data.path={path!r}: no training sequence of {sequence_length} tokens (read "
                            f"{len(texts)} files, {read:,} characters); pass more text or a smaller "
                            "data.sequence_length")
    (xt, yt), (xv, yv), (xs, ys) = arrays
    tokens = int(sum(int(np.count_nonzero(y != pad_id)) for _, y in arrays))
    return TextSplits(xt, yt, xv, yv, xs, ys, vocabulary, "text", f"{root} ({len(texts)} files)", pad_id=pad_id,
                      tokenizer=tokenizer or "byte", files=len(texts), tokens=tokens)


def objectives(splits: Splits):
    """``(loss, metrics)`` for the data: next-token cross-entropy and perplexity for text, else class accuracy.

    Text: ``keras.losses.SparseCategoricalCrossentropy(from_logits=True,
    ignore_class=pad_id)`` (Keras masks pad labels and divides by the count
    of real tokens: the mean over non-pad tokens of a batch) and
    ``keras_hub.metrics.Perplexity(from_logits=True, mask_token_id=pad_id)``
    (``exp`` of the mean cross-entropy over the non-pad tokens seen).
    Other data: the same loss without ``ignore_class`` and ``"accuracy"``.
    """
    import keras

    if not isinstance(splits, TextSplits):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]
    import keras_hub

    return (keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=splits.pad_id),
            [keras_hub.metrics.Perplexity(from_logits=True, mask_token_id=splits.pad_id, name="perplexity")])
