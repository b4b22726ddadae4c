"""A byte-level text corpus that every machine already has: the Python standard library's own source files.

The corpus is the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (site-packages, dist-packages and the
test suites left out), read as raw bytes: the vocabulary is the 256 byte values, so nothing is tokenised and
nothing is downloaded. It is deterministic on one Python version and differs between versions (other files,
other contents), which is why every split carries the SHA-256 of what it holds (``TextSplit.content_hash``) and
the Python version it was read from; a cache written by another Python or over other files is detected and
rebuilt, and a run records the hash it trained on.

How the files are chosen and split, all by the relative path:

* files are ordered by the SHA-256 of their path relative to the stdlib root (a spread over the whole library,
  not the first packages of the alphabet), and taken whole, in that order, while they fit in ``max_bytes``;
* a file goes to validation when the first 8 hex digits of the SHA-256 of ``"split:" + path``, as an integer,
  fall below ``val_fraction * 2**32``, else to training: a whole file is on one side only, so validation
  measures generalisation to unseen modules, never to unseen halves of a seen one;
* each side is its files concatenated in that order, each followed by one ``SEPARATOR`` byte (0, which no
  source file here contains), so a model can tell where one file ends.

>>> split = load_split(max_bytes=2_000_000)          # doctest: +SKIP
>>> split.train.dtype, len(split.val) / (len(split.train) + len(split.val))
(dtype('uint8'), 0.1...)
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256  # byte values
SEPARATOR = 0  # ends every file in the concatenated streams
EXCLUDED_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_CACHE_VERSION = 1


def stdlib_root() -> Path:
    """The standard library folder of this Python (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    """The interpreter version the corpus is read from, e.g. ``"3.11.7"`` (the corpus depends on it)."""
    return ".".join(str(v) for v in sys.version_info[:3])


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def is_validation(path: str, val_fraction: float) -> bool:
    """Whether the file at relative ``path`` belongs to validation (a hash of the path, see the module doc)."""
    return int(_digest("split:" + path)[:8], 16) < val_fraction * 2**32


def source_files(root: str | Path | None = None) -> list[str]:
    """Relative paths (POSIX form) of every ``.py`` file under ``root`` (default: the stdlib) outside
    :data:`EXCLUDED_PARTS`, sorted."""
    root = Path(root) if root is not None else stdlib_root()
    paths = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_PARTS.isdisjoint(relative.parts[:-1]) and path.is_file():
            paths.append(relative.as_posix())
    return sorted(paths)


def choose_files(sizes: dict[str, int], max_bytes: int) -> list[str]:
    """Paths in SHA-256-of-path order, each taken whole while the total (one separator byte per file
    included) stays within ``max_bytes``; files that do not fit are skipped and later smaller ones may fit."""
    chosen, total = [], 0
    for path in sorted(sizes, key=_digest):
        if total + sizes[path] + 1 <= max_bytes:
            chosen.append(path)
            total += sizes[path] + 1
    return chosen


@dataclass(frozen=True)
class TextSplit:
    """Train and validation byte streams of the corpus.

    Attributes:
        train, val: uint8 arrays, the files of each side concatenated (each followed by ``SEPARATOR``).
        train_files, val_files: the relative paths on each side, in stream order.
        content_hash: SHA-256 over every chosen path and its bytes, in order: equal hashes, equal corpus.
        python: the Python version the files were read from.
    """

    train: np.ndarray
    val: np.ndarray
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    content_hash: str
    python: str

    def describe(self) -> dict:
        """Plain-data summary for results: sizes, file counts, hash and Python version."""
        return {"train_bytes": int(len(self.train)), "val_bytes": int(len(self.val)),
                "train_files": len(self.train_files), "val_files": len(self.val_files),
                "content_hash": self.content_hash, "python": self.python}


def build_split(max_bytes: int, val_fraction: float, root: str | Path | None = None) -> TextSplit:
    """Read the corpus from ``root`` (default: this Python's stdlib) and split it (see the module doc)."""
    _check(max_bytes, val_fraction)
    root = Path(root) if root is not None else stdlib_root()
    sizes = {path: (root / path).stat().st_size for path in source_files(root)}
    chosen = choose_files(sizes, max_bytes)
    content = hashlib.sha256()
    sides: dict[bool, tuple[list[bytes], list[str]]] = {False: ([], []), True: ([], [])}
    for path in chosen:
        data = (root / path).read_bytes()
        content.update(path.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        chunks, names = sides[is_validation(path, val_fraction)]
        chunks += [data, bytes([SEPARATOR])]
        names.append(path)
    if not sides[False][1] or not sides[True][1]:
        raise ValueError(f"max_bytes={max_bytes} with val_fraction={val_fraction} leaves no file on one side of the "
                         f"split ({len(sides[False][1])} train, {len(sides[True][1])} validation files); raise "
                         "max_bytes or move val_fraction away from 0 and 1")

    def stream(side: bool) -> np.ndarray:
        return np.frombuffer(b"".join(sides[side][0]), dtype=np.uint8).copy()

    return TextSplit(stream(False), stream(True), tuple(sides[False][1]), tuple(sides[True][1]),
                     content.hexdigest(), python_version())


def _check(max_bytes: int, val_fraction: float) -> None:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1024:
        raise ValueError(f"max_bytes must be an integer >= 1024, got max_bytes={max_bytes!r}")
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise ValueError(f"val_fraction must be a number in (0, 1), got val_fraction={val_fraction!r}")


def _cache_path(cache_dir: str | Path, max_bytes: int, val_fraction: float) -> Path:
    return Path(cache_dir) / f"stdlib-py{python_version()}-b{max_bytes}-v{val_fraction:g}-c{_CACHE_VERSION}.npz"


def _manifest(root: Path, max_bytes: int) -> str:
    """Hash of the chosen paths and their sizes: cheap to recompute, and it changes with the files."""
    sizes = {path: (root / path).stat().st_size for path in source_files(root)}
    return _digest("\n".join(f"{path} {sizes[path]}" for path in choose_files(sizes, max_bytes)))


def _read_cache(path: Path, manifest: str) -> TextSplit | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            if int(f["version"]) != _CACHE_VERSION or str(f["manifest"]) != manifest or str(f["python"]) != \
                    python_version():
                return None
            train, val = f["train"], f["val"]
            content_hash = str(f["content_hash"])
            train_files, val_files = tuple(str(s) for s in f["train_files"]), tuple(str(s) for s in f["val_files"])
            if hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest() != str(f["stream_hash"]):
                return None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    return TextSplit(train, val, train_files, val_files, content_hash, python_version())


def load_split(max_bytes: int = 8_000_000, val_fraction: float = 0.1, cache_dir: str | Path | None = None,
               root: str | Path | None = None) -> TextSplit:
    """The corpus split of :func:`build_split`, read from or written to an ``.npz`` cache in ``cache_dir``.

    The cache file is named by the Python version and the settings, and holds a manifest hash of the chosen
    paths and sizes plus a hash of the streams: a cache from another Python, over changed files, or damaged, is
    rebuilt and overwritten. Without ``cache_dir`` the files are read every time (well under a second).
    """
    _check(max_bytes, val_fraction)
    if cache_dir is None:
        return build_split(max_bytes, val_fraction, root)
    root = Path(root) if root is not None else stdlib_root()
    path = _cache_path(cache_dir, max_bytes, val_fraction)
    manifest = _manifest(root, max_bytes)
    cached = _read_cache(path, manifest) if path.exists() else None
    if cached is not None:
        return cached
    split = build_split(max_bytes, val_fraction, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp.npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, version=_CACHE_VERSION, manifest=manifest, python=python_version(), train=split.train,
                 val=split.val, train_files=np.array(split.train_files), val_files=np.array(split.val_files),
                 content_hash=split.content_hash,
                 stream_hash=hashlib.sha256(split.train.tobytes() + split.val.tobytes()).hexdigest())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return split


def unigram_bits_per_byte(train: np.ndarray, val: np.ndarray) -> float:
    """Bits per byte of ``val`` under the training bytes' frequencies (add-one smoothed): the score of a model
    that ignores context, the text analogue of the maze's copy-the-input rate."""
    counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[val].mean())


def window_count(stream: np.ndarray, seq_len: int) -> int:
    """Non-overlapping (input, next-byte target) windows of ``seq_len`` in ``stream``."""
    return max(0, (len(stream) - 1) // seq_len)


def windows(stream: np.ndarray, seq_len: int, count: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` (0: all) non-overlapping windows of ``stream``: int64 ``(inputs, targets)``, each
    ``(count, seq_len)``, targets the inputs shifted by one byte."""
    n = window_count(stream, seq_len)
    count = n if count == 0 else min(count, n)
    if count == 0:
        raise ValueError(f"a stream of {len(stream)} bytes holds no window of seq_len={seq_len}")
    span = stream[: count * seq_len + 1].astype(np.int64)
    return span[:-1].reshape(count, seq_len), span[1:].reshape(count, seq_len)


def random_windows(stream: np.ndarray, seq_len: int, batch: int, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """``batch`` windows at uniform random offsets: int64 ``(inputs, targets)``, each ``(batch, seq_len)``."""
    starts = rng.integers(0, len(stream) - seq_len, size=batch)  # (B,)
    index = starts[:, None] + np.arange(seq_len + 1)  # (B, L + 1)
    span = stream[index].astype(np.int64)
    return span[:, :-1], span[:, 1:]


def bits(nats: float) -> float:
    """Nats to bits."""
    return nats / math.log(2)
