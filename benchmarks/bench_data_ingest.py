"""`scalelab data ingest -j N` against calling HF `tokenizers` directly on the same text with the same
number of threads; prints harness JSON lines (MB of text per wall second and per CPU second, min/median/max
of interleaved rounds).

Baseline — what a person would write instead of scalelab's ingest, in a fresh process: read the same JSONL
file line by line, ``Tokenizer.encode_batch_fast`` (``encode_batch`` on tokenizers < 0.21) over batches of
1,024 documents with the same ``tokenizer.json``, append EOD after every document, and write the ids as
uint16 shard files of the same ``--shard-tokens`` (no checksums, no index, no resume state, no held-out
split). Its parallelism is the tokenizer's own Rust thread pool with ``RAYON_NUM_THREADS=N``, so both sides
have N threads of tokenizing: scalelab runs N processes (this one and N−1 pool workers, tokenizer
threads off) plus its fingerprint process and writer thread; with N = 1 it tokenizes in one process
with the tokenizer's own threads, so it runs under the same ``RAYON_NUM_THREADS=1`` (both sides get the
same environment). It is the fair baseline because it is the
fastest direct use of the same tokenizer on the same bytes producing the same arrays: the check
``identical_output`` compares the baseline's token stream with the store's (``--heldout-fraction 1e-9``, so
every document is in the train split, in order).

Both sides are the real programs in fresh processes (imports, start-up, file writes: everything the user
waits for), interleaved (A B, B A, …; the first round already finds the libraries in the page cache, as
this process wrote the corpus and trained the tokenizer); CPU seconds are the whole process
tree's (`harness.CpuMeter`, which sees the forkserver's workers). Goal (issue 21): ≥ 0.9× per CPU-second
at 100 MB (``--mb 100``); the default 4 MB keeps `make bench` short, where start-up weighs more.

    .venv/bin/python benchmarks/bench_data_ingest.py                      # 4 MB, BPE, -j 1 and -j 2
    .venv/bin/python benchmarks/bench_data_ingest.py --mb 100 --rounds 3  # the issue's size
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from harness import compare, emit, fresh_process, python

BATCH_DOCS = 1024
EOD_TOKEN = "<|endoftext|>"


def write_corpus(root: Path, mb: float) -> Path:
    """The repeated built-in corpus as one JSONL file (one document a line)."""
    from bench_data_loader import RepeatedCorpus  # (scalelab's imports stay out of the baseline's process)

    path = root / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for d in RepeatedCorpus(int(mb * (1 << 20))).documents():
            fh.write(json.dumps({"text": d.text}, ensure_ascii=False) + "\n")
    return path


def direct_tokenizers(corpus: Path, tokenizer: Path, out: Path, shard_tokens: int) -> None:
    """The baseline program: JSONL → `encode_batch_fast` → uint16 shard files (threads: RAYON_NUM_THREADS)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    eod = tok.token_to_id(EOD_TOKEN)
    out.mkdir(parents=True, exist_ok=True)
    pending: list[np.ndarray] = []
    held = 0
    shard = 0

    def flush(final: bool) -> None:
        nonlocal pending, held, shard
        if not pending:
            return
        stream = np.concatenate(pending)
        cut = len(stream) if final else len(stream) - len(stream) % shard_tokens
        for start in range(0, cut, shard_tokens):
            stream[start : start + shard_tokens].tofile(out / f"shard-{shard:05d}.bin")
            shard += 1
        pending, held = [stream[cut:]], len(stream) - cut

    def add(texts: list[str]) -> None:
        nonlocal held
        for e in encode(texts):
            ids = np.asarray(e.ids, dtype=np.uint16)
            pending.extend((ids, np.array([eod], dtype=np.uint16)))
            held += len(ids) + 1
        if held >= shard_tokens:
            flush(final=False)

    texts: list[str] = []
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            texts.append(json.loads(line)["text"])
            if len(texts) == BATCH_DOCS:
                add(texts)
                texts = []
    if texts:
        add(texts)
    flush(final=True)


def token_stream(directory: Path, pattern: str) -> np.ndarray:
    return np.concatenate([np.fromfile(f, dtype=np.uint16) for f in sorted(directory.glob(pattern))])


def same_tokens(store: Path, direct: Path) -> bool:
    """Whether the store's train shards hold exactly the baseline's token stream."""
    from scalelab.data.store import TokenStore

    s = TokenStore.open(store)
    ours = np.concatenate([s.shard_array("train", i) for i in range(len(s.shards("train")))])
    return bool(np.array_equal(ours, token_stream(direct, "shard-*.bin")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4, help="corpus size (MB of text)")
    ap.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (trained on 1 MB)")
    ap.add_argument("--threads", default="1,2", help="comma-separated N: -j N against N tokenizer threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-tokens", type=int, default=1 << 22)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--direct", nargs=3, metavar=("CORPUS", "TOKENIZER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.direct:  # the baseline's own process
        direct_tokenizers(Path(args.direct[0]), Path(args.direct[1]), Path(args.direct[2]), args.shard_tokens)
        return

    from bench_data_loader import RepeatedCorpus

    from scalelab.data.tokenize import train_bpe

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        corpus = write_corpus(root, args.mb)
        mb = corpus.stat().st_size / (1 << 20)
        tok = train_bpe([RepeatedCorpus(1 << 20)], vocab_size=args.vocab_size, max_bytes=1 << 20)
        tok_file = tok.save(root / "tokenizer.json")
        for n in (int(x) for x in args.threads.split(",")):
            store, direct = root / f"store-{n}", root / f"direct-{n}"
            ours = [sys.executable, "-m", "scalelab", "data", "ingest", str(corpus), "-o", str(store)]
            ours += ["-j", str(n), "--tokenizer-file", str(tok_file), "--heldout-fraction", "1e-9"]
            ours += ["--shard-tokens", str(args.shard_tokens)]
            theirs = python("bench_data_ingest.py", "--shard-tokens", str(args.shard_tokens))
            theirs += ["--direct", str(corpus), str(tok_file), str(direct)]
            threads_env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(n)}

            def fresh(argv: list[str], out: Path, env: dict[str, str] | None = None):
                side = fresh_process(argv, mb, env)

                def run():
                    shutil.rmtree(out, ignore_errors=True)  # a fresh ingest each time, never a resume
                    return side()

                return run

            result = compare(
                f"ingest_bpe_j{n}_vs_direct_tokenizers",
                fresh(ours, store, threads_env),
                fresh(theirs, direct, threads_env),
                "MB/s",
                rounds=args.rounds,
                baseline_name=f"tokenizers.encode_batch_fast, RAYON_NUM_THREADS={n}, uint16 shard files",
                corpus_mb=mb,
                vocab_size=args.vocab_size,
                goal_cpu_ratio=0.9,
                goal_at_mb=100,
            )
            result["identical_output"] = same_tokens(store, direct)
            emit(result)


if __name__ == "__main__":
    main()
