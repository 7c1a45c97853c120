"""Fixtures shared by several test modules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


@pytest.fixture()
def tiny_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """~30 real stdlib files (the email package) as a text corpus, with a private scalelab cache."""
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    src = Path(json.__file__).parent.parent / "email"  # small and always present
    for i, f in enumerate(sorted(src.glob("*.py"))):
        (corpus / f"doc{i}.txt").write_text(f.read_text())
    return corpus


# An MFU above 1.0 is a bug: make MetricsLogger raise instead of logging (inherited by subprocess runs).
os.environ.setdefault("SCALELAB_STRICT_MFU", "1")
