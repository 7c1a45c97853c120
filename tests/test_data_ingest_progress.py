"""`data ingest` progress: the text each chunk covered adds up to the sources' size; a bar on a terminal."""

from __future__ import annotations

import os
import subprocess
import sys

from scalelab.data.corpus import JsonlSource, TextSource
from scalelab.data.ingest import ingest
from scalelab.data.store import TokenStore
from scalelab.data.tokenize import ByteTokenizer
from test_data_ingest_parallel import KW, WORDS, make_corpus


def test_ingest_reports_the_text_it_covered_adding_up_to_the_sources_size(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=30)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(f'{{"text": "doc {i} {" ".join(WORDS[: i % 15])}"}}\n' for i in range(200)))
    sources = [TextSource(corpus), JsonlSource(jsonl, "text")]
    seen: list[int] = []
    tokens: list[int] = []
    out = ingest(
        sources, tmp_path / "s", ByteTokenizer(), progress=tokens.append, text_progress=seen.append, **KW
    )
    assert len(seen) > 10 and sum(seen) == sum(s.size_bytes() for s in sources)
    info = TokenStore.open(out).info()
    assert sum(tokens) == sum(s["tokens"] for s in info["splits"].values())


def test_cli_ingest_draws_a_progress_bar_on_a_terminal(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=40)
    leader, follower = os.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "scalelab", "data", "ingest", str(corpus), "--out", str(tmp_path / "s")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(120) == 0
    os.close(leader)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert "ingest" in screen and "tokens" in screen and "━" in screen, screen[-2000:]
    assert TokenStore.open(tmp_path / "s").verify() == []
