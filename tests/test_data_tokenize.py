"""Tokenizers: lossless round trips, EOD placement, stable hashes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelab.data.corpus import TextSource
from scalelab.data.tokenize import (
    BPETokenizer,
    ByteTokenizer,
    tokenizer_from_definition,
    train_bpe,
)
from scalelab.errors import DataError


@given(st.text())
@settings(max_examples=200, deadline=None)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and (ids < 256).all()
    assert tok.decode(ids) == text


@given(st.lists(st.text(max_size=50), max_size=8))
@settings(max_examples=100, deadline=None)
def test_byte_encode_documents_matches_slow_path(texts):
    tok = ByteTokenizer()
    fast = tok.encode_documents(texts)
    slow = [np.append(tok.encode(t), tok.eod_id) for t in texts]
    expect = np.concatenate(slow) if slow else np.zeros(0)
    assert fast.dtype == np.uint16
    np.testing.assert_array_equal(fast, expect)


def test_byte_basics():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eod_id, tok.name) == (257, 256, "byte")
    assert tok.decode([104, 105, 256, 33]) == "hi!"
    assert tok.hash == ByteTokenizer().hash
    assert isinstance(tokenizer_from_definition(tok.definition()), ByteTokenizer)


CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n" * 5,
    "Unicode: naïve café 日本語 🙂 — ok\n" * 3,
]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(CORPUS * 5, vocab_size=400, min_frequency=2)


def test_bpe_round_trip(bpe, tmp_path):
    assert bpe.vocab_size <= 400 and bpe.vocab_size > 257
    assert bpe.eod_id == 0
    for text in [*CORPUS, "  leading spaces", "unseen ✓ ∑ text\r\n\ttabs"]:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
    merged = bpe.encode("The quick brown fox")
    assert len(merged) < len("The quick brown fox")  # merges learned
    docs = bpe.encode_documents(["ab", "cd"])
    assert (docs == bpe.eod_id).sum() == 2 and docs[-1] == bpe.eod_id
    assert bpe.decode(docs) == "abcd"
    path = bpe.save(tmp_path / "tokenizer.json")
    again = BPETokenizer.load(path)
    assert again.hash == bpe.hash
    np.testing.assert_array_equal(again.encode(CORPUS[0]), bpe.encode(CORPUS[0]))
    assert tokenizer_from_definition(bpe.definition()).hash == bpe.hash


def test_bpe_training_is_deterministic(bpe):
    again = BPETokenizer.train(CORPUS * 5, vocab_size=400, min_frequency=2)
    assert again.hash == bpe.hash


def test_train_bpe_from_sources(tmp_path):
    for i, text in enumerate(CORPUS):
        (tmp_path / f"{i}.txt").write_text(text * 3)
    tok = train_bpe([TextSource(tmp_path)], vocab_size=300)
    assert tok.decode(tok.encode(CORPUS[3])) == CORPUS[3]


def test_bpe_load_errors(tmp_path):
    with pytest.raises(DataError, match="missing.json"):
        BPETokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match="bad.json"):
        BPETokenizer.load(bad)
