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

Every source also splits into spans (`Span`): consecutive runs of its documents, about a target size each,
that another process can read back by itself. File-backed sources describe a span by a few paths
and offsets (files for ``builtin``/``text``, line-aligned byte ranges with their first line number
for ``jsonl``, row groups with their first row for ``parquet``), so parallel ingest ships no text to
its workers; any other source's spans carry their documents. Reading the spans in order yields
exactly `documents()` (same ids, same texts), whatever the target size.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Span:
    """A consecutive run of one source's documents, readable in any process.

    ``reader`` is the (small, picklable) source that reads `part` back, or None when `part` is the
    list of documents itself. `size_bytes` is about how much text the span holds.
    """

    reader: Source | None
    part: Any
    size_bytes: int

    def documents(self) -> Iterator[Document]:
        return iter(self.part) if self.reader is None else self.reader.read_part(self.part)


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

    def size_bytes(self) -> int | None:
        """About how many bytes of text `spans` will cover (for progress bars): the files' sizes, None when
        not file-backed. Cheap: no file is read."""
        files = self.files()
        return None if files is None else sum(_file_size(f) for f in files)

    def spans(self, target_bytes: int) -> Iterator[Span]:
        """Consecutive spans of about `target_bytes` of text covering `documents()` in order.

        This default reads the documents here and lets each span carry its own; file-backed
        sources override it (and `read_part`) to describe spans by location instead.
        """
        return _group(((d, len(d.text) + 1) for d in self.documents()), target_bytes, lambda docs: docs, None)

    def read_part(self, part: Any) -> Iterator[Document]:
        """The documents of a span's `part` (see `spans`)."""
        raise NotImplementedError(f"{type(self).__name__} does not read spans by location")

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


def _group(
    items: Iterable[tuple[Any, int]],
    target_bytes: int,
    part: Callable[[list[Any]], Any],
    reader: Source | None,
) -> Iterator[Span]:
    """Spans of consecutive `items` (item, size) holding at least `target_bytes` each (the last may
    hold less); ``part(items)`` builds a span's part from its items."""
    chunk: list[Any] = []
    size = 0
    for item, n in items:
        chunk.append(item)
        size += n
        if size >= target_bytes:
            yield Span(reader, part(chunk), size)
            chunk, size = [], 0
    if chunk:
        yield Span(reader, part(chunk), size)


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

    def _nonempty_files(self) -> list[str]:
        files = self.relative_files()
        if not files:
            raise DataError(f"{self.root}: no Python sources found for the built-in corpus")
        return files

    def documents(self) -> Iterator[Document]:
        yield from self.read_part(("files", tuple(self._nonempty_files())))
        if self.include_topics:
            yield from self.read_part(("topics",))

    def spans(self, target_bytes: int) -> Iterator[Span]:
        sizes = ((rel, _file_size(self.root / rel)) for rel in self._nonempty_files())
        yield from _group(sizes, target_bytes, lambda rels: ("files", tuple(rels)), self)
        if self.include_topics:
            yield Span(self, ("topics",), 0)

    def read_part(self, part: Any) -> Iterator[Document]:
        """`part`: ``("files", relative paths)``, or ``("topics",)`` for all pydoc topics by key."""
        if part[0] == "topics":
            from pydoc_data.topics import topics

            for key in sorted(topics):
                yield Document(f"pydoc_data/{key}", topics[key])
            return
        for rel in part[1]:
            raw = _read_bytes(self.root / rel)
            yield Document(f"stdlib/{rel}", raw.decode("utf-8", errors="replace"))

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


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def _open_binary(path: Path) -> Any:
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def _line_ranges(path: Path, target_bytes: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, number of the first line) of consecutive runs of whole lines of `path`, each of
    at least `target_bytes` bytes (the last may be shorter)."""
    size = _file_size(path)
    with _open_binary(path) as fh:
        start, first_line = 0, 1
        while start < size:
            end = size
            if start + target_bytes < size:
                fh.seek(start + target_bytes - 1)
                fh.readline()  # to the end of the line holding the target's last byte
                end = fh.tell()
            fh.seek(start)
            newlines = fh.read(end - start).count(b"\n")
            yield start, end, first_line
            start, first_line = end, first_line + newlines


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
        return self.read_part(list_files(self.path))

    def spans(self, target_bytes: int) -> Iterator[Span]:
        sizes = (((rel, f), _file_size(f)) for rel, f in list_files(self.path))
        return _group(sizes, target_bytes, lambda pairs: pairs, self)

    def read_part(self, part: Any) -> Iterator[Document]:
        """`part`: (relative id, path) pairs, one document per file."""
        for rel, f in part:
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
            with _open_binary(f) as fh:
                yield from self._documents_of_lines(rel, f, fh, 1)
        if self.skipped:
            log.warning("%s: skipped %d bad line(s)", self.path, self.skipped)

    def spans(self, target_bytes: int) -> Iterator[Span]:
        """Line-aligned byte ranges of each file, with the number of their first line (the one
        pass over the bytes here counts newlines; the JSON is parsed where the span is read)."""
        for rel, f in list_files(self.path):
            for start, end, first_line in _line_ranges(f, target_bytes):
                yield Span(self, (rel, f, start, end, first_line), end - start)

    def read_part(self, part: Any) -> Iterator[Document]:
        """`part`: (relative id, path, start byte, end byte, number of the line at start)."""
        rel, f, start, end, first_line = part
        with _open_binary(f) as fh:
            fh.seek(start)
            lines = fh.read(end - start).split(b"\n")
        if lines[-1] == b"":  # the range ends with a newline (always, except at a file's end)
            lines.pop()
        yield from self._documents_of_lines(rel, f, lines, first_line)

    def _documents_of_lines(
        self, rel: str, f: Path, lines: Iterable[bytes], first_line: int
    ) -> Iterator[Document]:
        for lineno, line in enumerate(lines, start=first_line):
            if not line.strip():
                continue
            text, problem = self._parse(line)
            if problem is not None:
                if self.skip_bad:
                    self.skipped += 1
                    continue
                raise DataError(f"{f}:{lineno}: {problem} (use skip_bad to skip such lines)")
            yield Document(f"{rel}:{lineno}", text)

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
        self.skipped = 0
        for rel, f in list_files(self.path):
            yield from self.read_part((rel, f, None, 0))

    def spans(self, target_bytes: int) -> Iterator[Span]:
        """Runs of row groups (sized by their uncompressed bytes), with the index of their first row."""
        for rel, f in list_files(self.path):
            meta = self._open(f).metadata
            groups, row = [], 0
            for i in range(meta.num_row_groups):
                groups.append((i, row, meta.row_group(i).total_byte_size))
                row += meta.row_group(i).num_rows
            for span in _group(((g, g[2]) for g in groups), target_bytes, tuple, None):
                rgs = span.part
                yield Span(self, (rel, f, tuple(g[0] for g in rgs), rgs[0][1]), span.size_bytes)

    def size_bytes(self) -> int | None:
        """The row groups' uncompressed bytes, as `spans` sizes them (from the files' metadata)."""
        total = 0
        for _, f in list_files(self.path):
            meta = self._open(f).metadata
            total += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        return total

    def read_part(self, part: Any) -> Iterator[Document]:
        """`part`: (relative id, path, row groups or None for all, index of the first row)."""
        import pyarrow as pa

        rel, f, row_groups, row = part
        pf = self._open(f)
        try:
            for batch in pf.iter_batches(
                batch_size=self.batch_rows, row_groups=row_groups, columns=[self.field]
            ):
                for value in batch.column(0).to_pylist():
                    if value is None:
                        self.skipped += 1
                    else:
                        yield Document(f"{rel}:{row}", value)
                    row += 1
        except pa.ArrowException as err:
            raise DataError(f"{f}: cannot read row group near row {row} ({err})") from None

    def _open(self, f: Path) -> Any:
        """The file as a ``pyarrow.parquet.ParquetFile`` whose `field` is a string column."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f)
        except OSError as err:
            raise DataError(f"{f}: cannot read Parquet file ({err})") from None
        except pa.ArrowException as err:
            raise DataError(f"{f}: not a valid Parquet file ({err})") from None
        schema = pf.schema_arrow
        if self.field not in schema.names:
            raise DataError(f"{f}: no column '{self.field}' (columns: {', '.join(schema.names) or 'none'})")
        col_type = schema.field(self.field).type
        if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
            raise DataError(f"{f}: column '{self.field}' has type {col_type}, expected a string column")
        return pf

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
        yield from _numbered(i, src.documents())


def iter_spans(sources: Sequence[Source], target_bytes: int) -> Iterator[tuple[int, Span]]:
    """(source position, span) for all sources in order: `span_documents` of each, concatenated,
    is `iter_documents(sources)`."""
    for i, src in enumerate(sources):
        for span in src.spans(target_bytes):
            yield i, span


def span_documents(source_index: int, span: Span) -> Iterator[Document]:
    """A span's documents with ids prefixed as `iter_documents` prefixes them."""
    return _numbered(source_index, span.documents())


def _numbered(i: int, docs: Iterable[Document]) -> Iterator[Document]:
    for doc in docs:
        yield Document(f"{i}:{doc.doc_id}", doc.text)


def combined_fingerprint(sources: Iterable[Source]) -> str:
    """SHA-256 over the ordered fingerprints of several sources."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for src in sources:
        h.update(src.fingerprint().encode())
    return h.hexdigest()
