"""
Text corpora: where the training documents come from.

A corpus is just a sequence of documents (Python strings). Two sources:

- The default corpus needs no download: the Python standard library's own
  source files, found at run time under sysconfig.get_paths()["stdlib"].
  ~800 files / ~12 MB of real, varied code and docstrings on CPython 3.11,
  which is plenty for a testbed that compares optimizers on small GPTs.
- User paths: text files, directories (walked recursively), or parquet files
  with a `text` column (the nanochat / FineWeb shard layout; needs pyarrow).

Everything is deterministic (paths are sorted) and lazy (iter_* functions read
files one at a time), so a `max_bytes` cap means a tiny run only reads the
first few MB off disk.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

# Directories skipped in the stdlib walk. site-packages/dist-packages are not
# the stdlib (and differ between machines, which would break determinism).
# The test suites are ~half the stdlib's bytes, are dominated by repetitive
# assertion code, and contain files that are deliberately mis-encoded or
# otherwise odd, so they are left out as well.
_STDLIB_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__",
    "test", "tests", "idle_test",
})

PARQUET_SUFFIXES = (".parquet", ".pq")


class CorpusError(ValueError):
    """A corpus input that cannot be used; the message names the path."""


# -----------------------------------------------------------------------------
# the default corpus: the Python standard library's source

def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_paths() -> list[Path]:
    """All stdlib *.py files, sorted by their path relative to the stdlib root."""
    root = stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # pruning in place stops os.walk from descending into skipped dirs
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    # sort on the relative posix path so the order is identical on every machine
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def iter_stdlib_documents() -> Iterator[str]:
    """One document per stdlib source file; files that are not UTF-8 are skipped."""
    for path in stdlib_paths():
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            # a handful of stdlib files use legacy encodings; the default
            # corpus is best-effort, so drop them instead of failing the run
            continue
        if "\x00" not in text:
            yield text


# -----------------------------------------------------------------------------
# user-provided paths

def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise CorpusError(f"{path}: looks like a binary file (contains NUL bytes); corpus files must be UTF-8 text")
    try:
        # utf-8-sig drops a leading byte-order mark, which is not part of the text
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None


def _iter_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"{path}: reading parquet needs pyarrow, which is not installed (pip install pyarrow)"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid etc.
        raise CorpusError(f"{path}: cannot be read as parquet ({e})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise CorpusError(f"{path}: parquet file has no 'text' column (columns: {names})")
    # row-group batches keep memory flat on multi-GB shards
    for batch in pf.iter_batches(columns=["text"]):
        for value in batch.column(0).to_pylist():
            if value is None:
                continue
            if not isinstance(value, str):
                raise CorpusError(f"{path}: 'text' column holds {type(value).__name__}, expected strings")
            yield value


def _iter_dir(path: Path) -> Iterator[Path]:
    """Files under a directory, recursively, sorted; hidden entries (.git, .DS_Store) skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames if not f.startswith("."))
    return iter(sorted(found, key=lambda p: p.relative_to(path).as_posix()))


def _iter_file(path: Path) -> Iterator[str]:
    if path.suffix.lower() in PARQUET_SUFFIXES:
        yield from _iter_parquet(path)
    else:
        yield _read_text_file(path)


def iter_path_documents(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Documents from user paths, in the order given: a file is one document,
    a directory is its files in sorted order, a parquet file is one document per row."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # a lone path is an easy mistake; treat it as a list of one
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise CorpusError(f"{path}: no such file or directory")
        if path.is_dir():
            for f in _iter_dir(path):
                yield from _iter_file(f)
        else:
            yield from _iter_file(path)


# -----------------------------------------------------------------------------
# the public entry points

def iter_documents(paths: Iterable[str | os.PathLike] | None = None,
                   max_bytes: int | None = None) -> Iterator[str]:
    """Lazily yield the non-empty documents of a corpus.

    paths=None selects the default stdlib corpus (an empty list is an empty
    corpus, not the default: a glob that matched nothing should fail loudly). max_bytes caps the
    total UTF-8 size: documents are taken in order until the cap, and the last
    one is cut (at a character boundary) so the total is exactly <= max_bytes.
    Whitespace-only documents (e.g. empty __init__.py files) are dropped.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    source = iter_stdlib_documents() if paths is None else iter_path_documents(paths)
    budget = max_bytes
    for doc in source:
        if not doc.strip():
            continue
        if budget is None:
            yield doc
            continue
        data = doc.encode("utf-8")
        if len(data) >= budget:
            # errors="ignore" drops a multi-byte character split by the cut
            tail = data[:budget].decode("utf-8", errors="ignore")
            if tail.strip():
                yield tail
            return
        budget -= len(data)
        yield doc


def load_corpus(paths: Iterable[str | os.PathLike] | None = None,
                max_bytes: int | None = None) -> list[str]:
    """All documents as a list; CorpusError if there are none."""
    if paths is not None:
        # materialize once: a generator of paths would be spent before the error message
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    docs = list(iter_documents(paths, max_bytes))
    if not docs:
        where = f"the stdlib at {stdlib_dir()}" if paths is None else ", ".join(map(str, paths)) or "(no paths given)"
        raise CorpusError(f"{where}: corpus is empty (no non-empty documents)")
    return docs
