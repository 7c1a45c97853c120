"""Corpus sources: order, fingerprints, and errors that name the file and line."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scalelab.data.corpus import (
    BuiltinCorpus,
    Document,
    JsonlSource,
    ParquetSource,
    Source,
    TextSource,
    iter_documents,
    iter_spans,
    sources_from_spec,
    span_documents,
    stdlib_dir,
)
from scalelab.errors import DataError
from scalelab.spec import DataSpec, SourceSpec


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))


def test_builtin_subset_is_sorted_and_fingerprint_deterministic():
    root = stdlib_dir() / "json"
    a = BuiltinCorpus(root=root, include_topics=False)
    b = BuiltinCorpus(root=root, include_topics=False)
    ids = [d.doc_id for d in a.documents()]
    assert ids == sorted(ids) and ids[0] == "stdlib/__init__.py"
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64


def test_builtin_excludes_site_packages_and_includes_topics():
    corpus = BuiltinCorpus()
    files = corpus.relative_files()
    assert len(files) > 1000
    assert not any("site-packages" in f or "dist-packages" in f for f in files)
    assert files == sorted(files)
    last = list(iter_documents([BuiltinCorpus(root=stdlib_dir() / "json")]))[-1]
    assert last.doc_id.startswith("0:pydoc_data/")


@pytest.mark.slow
def test_full_builtin_fingerprint_is_stable():
    assert BuiltinCorpus().fingerprint() == BuiltinCorpus().fingerprint()


def test_text_file_dir_and_glob(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee")
    (d / "a.txt").write_text("ay")
    (d / "sub" / "c.txt").write_text("sea")
    (d / ".hidden").write_text("no")
    assert [x.doc_id for x in TextSource(d).documents()] == ["a.txt", "b.txt", "sub/c.txt"]
    assert [x.text for x in TextSource(str(d / "*.txt")).documents()] == ["ay", "bee"]
    assert [x.doc_id for x in TextSource(str(d / "**" / "*.txt")).documents()] == [
        "a.txt",
        "b.txt",
        "sub/c.txt",
    ]
    assert list(TextSource(d / "a.txt").documents())[0].text == "ay"
    # Fingerprint depends on content, not location.
    other = tmp_path / "moved"
    d.rename(other)
    fp_moved = TextSource(other).fingerprint()
    (other / "a.txt").write_text("AY")
    assert TextSource(other).fingerprint() != fp_moved


def test_text_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nope"):
        list(TextSource(tmp_path / "nope").documents())
    with pytest.raises(DataError, match="no files match"):
        list(TextSource(str(tmp_path / "*.zzz")).documents())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        list(TextSource(tmp_path / "empty").documents())
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match="latin.txt.*UTF-8"):
        list(TextSource(bad).documents())


def test_jsonl_good_bad_and_skip(tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"text": "one"}),
        "",
        json.dumps({"text": "two", "x": 1}),
        "{not json",
        '{"t": 3}',
        "[1]",
    ]
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:4: not valid JSON"):
        list(JsonlSource(f, "text").documents())
    src = JsonlSource(f, "text", skip_bad=True)
    docs = list(src.documents())
    assert [(d.doc_id, d.text) for d in docs] == [("d.jsonl:1", "one"), ("d.jsonl:3", "two")]
    assert src.skipped == 3
    g = tmp_path / "e.jsonl"
    g.write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(DataError, match=r"e\.jsonl:1: field 'text' is int"):
        list(JsonlSource(g, "text").documents())
    h = tmp_path / "h.jsonl"
    h.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"h\.jsonl:1: field 'text' is missing"):
        list(JsonlSource(h, "text").documents())


def test_parquet_batches_and_errors(tmp_path):
    f = tmp_path / "t.parquet"
    texts = [f"row {i}" for i in range(1000)]
    texts[7] = None
    pq.write_table(pa.table({"text": texts, "n": list(range(1000))}), f, row_group_size=100)
    src = ParquetSource(f, "text", batch_rows=64)
    docs = list(src.documents())
    assert len(docs) == 999 and src.skipped == 1
    assert docs[0] == ("t.parquet:0", "row 0") and docs[7].doc_id == "t.parquet:8"
    with pytest.raises(DataError, match="t.parquet.*no column 'body'"):
        list(ParquetSource(f, "body").documents())
    with pytest.raises(DataError, match="column 'n' has type int64"):
        list(ParquetSource(f, "n").documents())
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet"):
        list(ParquetSource(junk, "text").documents())


def test_sources_from_spec(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    spec = DataSpec(sources=[SourceSpec(kind="text", path=str(tmp_path / "a.txt")), SourceSpec()])
    srcs = sources_from_spec(spec)
    assert [s.kind for s in srcs] == ["text", "builtin"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty corpus"):
        JsonlSource(empty, "text").fingerprint()


def test_fingerprint_cache_keyed_by_file_stats(tmp_path, monkeypatch):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("one")
    cache = tmp_path / "fp"
    first = TextSource(d).fingerprint(cache_dir=cache)
    assert first == TextSource(d).fingerprint()

    def boom(self):
        raise AssertionError("documents re-read although the files did not change")

    monkeypatch.setattr(TextSource, "documents", boom)
    assert TextSource(d).fingerprint(cache_dir=cache) == first
    monkeypatch.undo()
    (d / "a.txt").write_text("two")
    assert TextSource(d).fingerprint(cache_dir=cache) != first
    builtin = BuiltinCorpus(root=stdlib_dir() / "json")
    assert builtin.fingerprint(cache_dir=cache) == BuiltinCorpus(root=stdlib_dir() / "json").fingerprint()


# ------------------------------------------------------------------------------------------- spans
def span_sources(root):
    """One source of every kind, with the awkward cases: blank/CRLF/unterminated JSONL lines,
    Parquet nulls across row groups, a non-file source."""
    d = root / "docs"
    (d / "sub").mkdir(parents=True)
    for i in range(7):
        (d / ("sub" if i % 2 else ".") / f"f{i}.txt").write_text(f"file {i} ✓\n" * (i * 40 + 1))
    jl = root / "d.jsonl"
    lines = [json.dumps({"text": f"line {i} " * (i % 9 + 1)}) for i in range(40)]
    lines[5], lines[6] = "", "  "
    jl.write_bytes(("\n".join(lines[:20]) + "\r\n" + "\n".join(lines[20:])).encode())  # no final newline
    pqf = root / "t.parquet"
    texts = [None if i % 13 == 0 else f"row {i} " * (i % 5 + 1) for i in range(300)]
    pq.write_table(pa.table({"text": texts}), pqf, row_group_size=37)
    return [
        TextSource(d),
        JsonlSource(jl, "text"),
        ParquetSource(pqf, "text", batch_rows=16),
        BuiltinCorpus(root=stdlib_dir() / "json"),
        InMemory([f"doc {i}" * i for i in range(30)]),
    ]


class InMemory(Source):
    kind = "memory"

    def __init__(self, texts):
        super().__init__()
        self.texts = texts

    def documents(self):
        for i, t in enumerate(self.texts):
            yield Document(str(i), t)

    def describe(self):
        return {"kind": "memory", "path": None, "field": None}


@pytest.mark.parametrize("target", [1, 300, 1 << 20])
def test_spans_read_back_exactly_the_documents_in_another_process(tmp_path, target):
    for src in span_sources(tmp_path):
        spans = list(src.spans(target))
        assert spans
        shipped = [pickle.loads(pickle.dumps(s)) for s in spans]  # what a worker receives
        assert [d for s in shipped for d in s.documents()] == list(src.documents()), src
        if src.kind != "memory":  # located, not carried: no text travels
            assert all(s.reader is not None and len(pickle.dumps(s)) < 2000 for s in spans), src
        if target == 1 << 20:
            assert len(spans) == (2 if src.kind == "builtin" else 1)  # builtin: files, then topics
    both = [TextSource(tmp_path / "docs"), JsonlSource(tmp_path / "d.jsonl", "text")]
    assert [d for i, s in iter_spans(both, 100) for d in span_documents(i, s)] == list(iter_documents(both))


def test_jsonl_span_errors_name_the_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([json.dumps({"text": "x" * 50})] * 30 + ["{bad"] + ['{"text": "y"}']) + "\n")
    spans = list(JsonlSource(f, "text").spans(200))
    with pytest.raises(DataError, match=r"d\.jsonl:31: not valid JSON"):
        for s in spans:
            list(s.documents())
    assert [d.doc_id for s in JsonlSource(f, "text", skip_bad=True).spans(200) for d in s.documents()][
        -1
    ] == ("d.jsonl:32")
