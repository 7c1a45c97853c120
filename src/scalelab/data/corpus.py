"""Text sources that yield documents ``(doc_id, text)`` in a fixed, reproducible order.

Four kinds, matching `scalelab.spec.SourceSpec.kind`:

- ``builtin``: the Python standard library's own ``.py`` sources (site-packages excluded) in sorted
  relative-path order, then the ``pydoc_data.topics`` help topics sorted by key. About 30 MB of real
  text that exists on every machine with Python, so studies run without downloads.
- ``text``: one document per file; a file, a directory (recursive, hidden entries skipped) or a glob.
- ``jsonl``: one document per line, taken from a named string field.
- ``parquet``: one document per row, taken from a named string column, read in record batches.

Every source has a content fingerprint (SHA-256 over document ids and texts, computed streaming) so
token stores can be keyed by what they contain rather than by where the files live.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from scalelab.errors import DataError

if TYPE_CHECKING:  # specs need pydantic; the data layer itself does not
    from scalelab.spec import DataSpec, SourceSpec

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = "scalelab-source-v1"
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class Document(NamedTuple):
    """One document: a stable id (unique within its source) and its text."""

    doc_id: str
    text: str


class Source(ABC):
    """A deterministic stream of documents with a content fingerprint."""

    kind: str = "source"

    def __init__(self) -> None:
        self._fingerprint: str | None = None
        self.skipped = 0  # documents skipped during the last full pass (bad lines, null values)

    @abstractmethod
    def documents(self) -> Iterator[Document]:
        """Yield the documents in their fixed order."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """A small JSON-able description (kind, path, field) for indexes and provenance."""

    def files(self) -> list[Path] | None:
        """The files the documents come from (None when not file-backed)."""
        return None

    def stat_signature(self) -> str | None:
        """SHA-256 of the description and every file's (path, size, mtime_ns): cheap to compute,
        changes whenever a file is touched. None when the source is not file-backed."""
        files = self.files()
        if files is None:
            return None
        h = hashlib.sha256(f"{FINGERPRINT_VERSION}|{json.dumps(self.describe(), sort_keys=True)}".encode())
        h.update(repr(getattr(self, "skip_bad", None)).encode())
        for f in files:
            try:
                st = f.stat()
            except OSError as err:
                raise DataError(f"{f}: cannot read ({err.strerror or err})") from None
            _update_framed(h, f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def fingerprint(self, cache_dir: str | Path | None = None) -> str:
        """SHA-256 over (kind, field, every doc id and text); computed once per instance, streaming.

        With `cache_dir`, the result is remembered under ``<cache_dir>/fingerprints/`` keyed by
        `stat_signature()`, so unchanged files are not re-read by later processes.
        """
        if self._fingerprint is None and cache_dir is not None:
            sig = self.stat_signature()
            if sig is not None:
                entry = Path(cache_dir) / "fingerprints" / sig
                try:
                    cached = entry.read_text().strip()
                except OSError:
                    cached = ""
                if len(cached) == 64:
                    self._fingerprint = cached
                else:
                    from scalelab.data.shards import atomic_write_bytes

                    atomic_write_bytes(entry, self.fingerprint().encode())
        if self._fingerprint is None:
            h = hashlib.sha256(FINGERPRINT_VERSION.encode())
            desc = self.describe()
            _update_framed(h, f"{desc['kind']}|{desc.get('field') or ''}".encode())
            n = 0
            for doc in self.documents():
                _update_framed(h, doc.doc_id.encode("utf-8", "surrogatepass"))
                _update_framed(h, doc.text.encode("utf-8", "surrogatepass"))
                n += 1
            if n == 0:
                raise DataError(f"{self}: the source has no documents (empty corpus)")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __str__(self) -> str:
        desc = self.describe()
        return f"{desc['kind']} source {desc.get('path') or ''}".strip()


def _update_framed(h: Any, data: bytes) -> None:
    """Length-prefix each piece so that ("ab","c") and ("a","bc") hash differently."""
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


# ------------------------------------------------------------------------------------------ builtin
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


class BuiltinCorpus(Source):
    """The standard library's ``.py`` files (sorted) followed by ``pydoc_data`` topics (sorted by key).

    A handful of stdlib test files are deliberately not UTF-8; they are decoded with replacement
    characters so the corpus is the same on every run.
    """

    kind = "builtin"

    def __init__(self, root: str | Path | None = None, include_topics: bool = True) -> None:
        super().__init__()
        self.root = Path(root) if root is not None else stdlib_dir()
        self.include_topics = include_topics

    def relative_files(self) -> list[str]:
        """Sorted POSIX paths of the ``.py`` files, relative to the stdlib directory."""
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS]
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if name.endswith(".py"):
                    rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                    out.append(rel.replace(os.sep, "/"))
        out.sort()
        return out

    def files(self) -> list[Path]:
        return [self.root / rel for rel in self.relative_files()]

    def stat_signature(self) -> str | None:
        import sys

        base = super().stat_signature()
        return hashlib.sha256(f"{base}|{sys.version}|{self.include_topics}".encode()).hexdigest()

    def documents(self) -> Iterator[Document]:
        files = self.relative_files()
        if not files:
            raise DataError(f"{self.root}: no Python sources found for the built-in corpus")
        for rel in files:
            path = self.root / rel
            try:
                raw = path.read_bytes()
            except OSError as err:
                raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
            yield Document(f"stdlib/{rel}", raw.decode("utf-8", errors="replace"))
        if self.include_topics:
            from pydoc_data.topics import topics

            for key in sorted(topics):
                yield Document(f"pydoc_data/{key}", topics[key])

    def describe(self) -> dict[str, Any]:
        return {"kind": "builtin", "path": None, "field": None}


# ------------------------------------------------------------------------------------ file listing
_MAGIC = set("*?[")


def _glob_root(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard (ids are made relative to it)."""
    parts = Path(pattern).parts
    root: list[str] = []
    for p in parts:
        if _MAGIC & set(p):
            break
        root.append(p)
    return Path(*root) if root else Path(".")


def list_files(path: str) -> list[tuple[str, Path]]:
    """Expand a file, directory or glob into sorted ``(relative id, path)`` pairs.

    Raises `DataError` naming the path when it does not exist or matches nothing.
    """
    p = Path(path)
    if _MAGIC & set(path):
        root = _glob_root(path)
        matches = [Path(m) for m in globlib.glob(path, recursive=True)]
        files = [m for m in matches if m.is_file()]
        if not files:
            raise DataError(f"{path}: no files match this pattern")
    elif p.is_dir():
        root = p
        files = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
        if not files:
            raise DataError(f"{path}: the directory contains no files")
    elif p.is_file():
        return [(p.name, p)]
    else:
        raise DataError(f"{path}: no such file or directory")
    pairs = [(f.relative_to(root).as_posix() if f.is_relative_to(root) else f.as_posix(), f) for f in files]
    pairs.sort()
    return pairs


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


# --------------------------------------------------------------------------------------------- text
class TextSource(Source):
    """Plain UTF-8 text files, one document per file."""

    kind = "text"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)

    def files(self) -> list[Path]:
        return [f for _, f in list_files(self.path)]

    def documents(self) -> Iterator[Document]:
        for rel, f in list_files(self.path):
            raw = _read_bytes(f)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{f}: not UTF-8 text (invalid byte at offset {err.start})") from None
            yield Document(rel, text)

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "path": self.path, "field": None}


# -------------------------------------------------------------------------------------------- jsonl
class JsonlSource(Source):
    """JSON Lines: one document per non-blank line, the text in string field `field`.

    A malformed line (invalid JSON, not an object, missing or non-string field) raises `DataError`
    naming the file and line number, or with ``skip_bad=True`` is skipped and counted in `skipped`.
    """

    kind = "jsonl"

    def __init__(self, path: str | Path, field: str, skip_bad: bool = False) -> None:
        super().__init__()
        self.path = str(path)
        self.field = field
        self.skip_bad = skip_bad

    def files(self) -> list[Path]:
        return [f for _, f in list_files(self.path)]

    def documents(self) -> Iterator[Document]:
        self.skipped = 0
        for rel, f in list_files(self.path):
            try:
                fh = open(f, "rb")  # noqa: SIM115 - closed below, also on errors
            except OSError as err:
                raise DataError(f"{f}: cannot read ({err.strerror or err})") from None
            with fh:
                for lineno, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    text, problem = self._parse(line)
                    if problem is not None:
                        if self.skip_bad:
                            self.skipped += 1
                            continue
                        raise DataError(f"{f}:{lineno}: {problem} (use skip_bad to skip such lines)")
                    yield Document(f"{rel}:{lineno}", text)
        if self.skipped:
            log.warning("%s: skipped %d bad line(s)", self.path, self.skipped)

    def _parse(self, line: bytes) -> tuple[str, str | None]:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as err:
            return "", f"not valid JSON ({err})"
        if not isinstance(obj, dict):
            return "", f"expected a JSON object, got {type(obj).__name__}"
        if self.field not in obj:
            return "", f"field '{self.field}' is missing"
        value = obj[self.field]
        if not isinstance(value, str):
            return "", f"field '{self.field}' is {type(value).__name__}, expected a string"
        return value, None

    def describe(self) -> dict[str, Any]:
        return {"kind": "jsonl", "path": self.path, "field": self.field}


# ------------------------------------------------------------------------------------------ parquet
class ParquetSource(Source):
    """Parquet files: one document per row of string column `field`, read in record batches.

    Null values are skipped and counted in `skipped`; files are never loaded whole.
    """

    kind = "parquet"

    def __init__(self, path: str | Path, field: str, batch_rows: int = 4096) -> None:
        super().__init__()
        self.path = str(path)
        self.field = field
        self.batch_rows = batch_rows

    def files(self) -> list[Path]:
        return [f for _, f in list_files(self.path)]

    def documents(self) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.skipped = 0
        for rel, f in list_files(self.path):
            try:
                pf = pq.ParquetFile(f)
            except OSError as err:
                raise DataError(f"{f}: cannot read Parquet file ({err})") from None
            except pa.ArrowException as err:
                raise DataError(f"{f}: not a valid Parquet file ({err})") from None
            schema = pf.schema_arrow
            if self.field not in schema.names:
                raise DataError(
                    f"{f}: no column '{self.field}' (columns: {', '.join(schema.names) or 'none'})"
                )
            col_type = schema.field(self.field).type
            if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
                raise DataError(f"{f}: column '{self.field}' has type {col_type}, expected a string column")
            row = 0
            try:
                for batch in pf.iter_batches(batch_size=self.batch_rows, columns=[self.field]):
                    for value in batch.column(0).to_pylist():
                        if value is None:
                            self.skipped += 1
                        else:
                            yield Document(f"{rel}:{row}", value)
                        row += 1
            except pa.ArrowException as err:
                raise DataError(f"{f}: cannot read row group near row {row} ({err})") from None

    def describe(self) -> dict[str, Any]:
        return {"kind": "parquet", "path": self.path, "field": self.field}


# ------------------------------------------------------------------------------------------ helpers
def source_from_spec(spec: SourceSpec, skip_bad: bool = False) -> Source:
    """Build the `Source` a `SourceSpec` describes."""
    if spec.kind == "builtin":
        return BuiltinCorpus()
    assert spec.path is not None  # SourceSpec validates this
    if spec.kind == "text":
        return TextSource(spec.path)
    assert spec.field is not None
    if spec.kind == "jsonl":
        return JsonlSource(spec.path, spec.field, skip_bad=skip_bad)
    if spec.kind == "parquet":
        return ParquetSource(spec.path, spec.field)
    raise DataError(f"unknown source kind '{spec.kind}'")


def sources_from_spec(data_spec: DataSpec, skip_bad: bool = False) -> list[Source]:
    """The sources of a `DataSpec`, in order."""
    return [source_from_spec(s, skip_bad=skip_bad) for s in data_spec.sources]


def iter_documents(sources: Sequence[Source]) -> Iterator[Document]:
    """All documents of all sources, in order; doc ids are prefixed with the source's position."""
    for i, src in enumerate(sources):
        for doc in src.documents():
            yield Document(f"{i}:{doc.doc_id}", doc.text)


def combined_fingerprint(sources: Iterable[Source]) -> str:
    """SHA-256 over the ordered fingerprints of several sources."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for src in sources:
        h.update(src.fingerprint().encode())
    return h.hexdigest()
