"""`scalelab data ingest -j N` against ``-j 1`` in the same run; prints JSON lines
``{name, value, baseline, ratio, unit}``.

The corpus (the built-in stdlib text, repeated to `--mb` megabytes) is written once as files — one
JSONL file (one document a line) or a directory of text files — so that worker processes can read
their own spans of it. Each ingest is the real CLI in a fresh process (start-up, source fingerprint,
worker start, shard writes: everything the user waits for), with the tokenizer's own threads off
(``TOKENIZERS_PARALLELISM=false``: the baseline is one process on one core). Rounds alternate the
order (1, N, N, 1, …) so a change in the machine's load hits both sides; medians and each round's
paired ratio are printed with the 1-minute load average after every run.

Besides wall time it reports CPU seconds of the whole process tree and of the CLI process alone
(what stays serial in the parent), and ``cpu_bound_speedup``: the speedup these CPU seconds allow on
an otherwise idle machine (``min(N, cpus) * cpu_1 / cpu_N``), which tells contention from overhead.

    .venv/bin/python benchmarks/bench_data_ingest.py                        # 8 MB, BPE, 1 round
    .venv/bin/python benchmarks/bench_data_ingest.py --mb 32 --repeats 3    # the real measurement (BPE)
    .venv/bin/python benchmarks/bench_data_ingest.py --tokenizer byte --mb 512 --repeats 5

Byte-level tokenizing is nearly free, so at small sizes the fixed start-up (the CLI's imports in both,
the worker processes' start in ``-j 2``: ~0.4 s) weighs on the ratio: measure it at ≥ 0.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data_loader import CpuMeter, RepeatedCorpus, emit  # noqa: E402

from scalelab.data.tokenize import train_bpe  # noqa: E402


def write_corpus(root: Path, mb: float, kind: str) -> Path:
    """The repeated built-in corpus as one JSONL file or as a directory of text files."""
    docs = RepeatedCorpus(int(mb * (1 << 20))).documents()
    if kind == "jsonl":
        path = root / "corpus.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for d in docs:
                fh.write(json.dumps({"text": d.text}, ensure_ascii=False) + "\n")
        return path
    path = root / "corpus"
    path.mkdir()
    for i, d in enumerate(docs):
        (path / f"{i:07d}.txt").write_text(d.text, encoding="utf-8", errors="surrogatepass")
    return path


def run_cli(corpus: Path, out: Path, workers: int, tokenizer: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the process tree, CPU seconds of the CLI process alone)."""
    import psutil

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "scalelab",
        "data",
        "ingest",
        str(corpus),
        "-o",
        str(out),
        "-j",
        str(workers),
    ]
    t0, meter = time.perf_counter(), CpuMeter(interval=0.05)
    proc = psutil.Popen([*cmd, *tokenizer], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    own = 0.0
    while proc.poll() is None:
        try:
            t = proc.cpu_times()
            own = t.user + t.system
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    total = meter.stop()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode() if proc.stderr else ''}")
    return wall, total, own


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8, help="corpus size (MB of text)")
    ap.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe")
    ap.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (trained on 1 MB)")
    ap.add_argument("--source", choices=("jsonl", "text"), default="jsonl")
    ap.add_argument("--workers", type=int, default=2, help="compared against 1")
    ap.add_argument("--repeats", type=int, default=1, help="rounds (order alternates)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    W = args.workers

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        corpus = write_corpus(root, args.mb, args.source)
        mb = sum(f.stat().st_size for f in ([corpus] if corpus.is_file() else corpus.iterdir())) / (1 << 20)
        tok_args = ["--tokenizer", "byte"]
        if args.tokenizer == "bpe":
            tok = train_bpe([RepeatedCorpus(1 << 20)], vocab_size=args.vocab_size, max_bytes=1 << 20)
            tok.save(root / "tokenizer.json")
            tok_args = ["--tokenizer-file", str(root / "tokenizer.json")]

        runs: dict[int, list[tuple[float, float, float]]] = {1: [], W: []}
        loads: dict[int, list[float]] = {1: [], W: []}
        same = True
        for r in range(args.repeats):
            for workers in (1, W) if r % 2 == 0 else (W, 1):
                out = root / f"store-{workers}"
                runs[workers].append(run_cli(corpus, out, workers, tok_args))
                loads[workers].append(os.getloadavg()[0])
            same = same and store_bytes(root / "store-1") == store_bytes(root / f"store-{W}")
            for workers in (1, W):
                shutil.rmtree(root / f"store-{workers}")

        def med(w: int, i: int) -> float:
            return median(x[i] for x in runs[w])

        paired = [a[0] / b[0] for a, b in zip(runs[1], runs[W], strict=True)]
        cpus = os.cpu_count() or 1
        emit(
            f"ingest_{args.tokenizer}_{W}_workers_vs_1",
            mb / med(W, 0),
            mb / med(1, 0),
            "MB/s",
            baseline_name="scalelab data ingest -j 1 (tokenizer threads off)",
            identical_output=same,
            corpus_mb=mb,
            source=args.source,
            rounds=args.repeats,
            paired_ratios=paired,
            median_paired_ratio=median(paired),
            cpus=cpus,
            wall_seconds={str(w): [x[0] for x in runs[w]] for w in runs},
            cpu_seconds={str(w): [x[1] for x in runs[w]] for w in runs},
            parent_cpu_seconds={str(w): [x[2] for x in runs[w]] for w in runs},
            parent_cpu_share={str(w): med(w, 2) / med(w, 1) for w in runs},
            cores_used={str(w): med(w, 1) / med(w, 0) for w in runs},
            cpu_bound_speedup=min(W, cpus) * med(1, 1) / med(W, 1),
            loadavg_1m_after_each_run={str(w): loads[w] for w in loads},
        )


if __name__ == "__main__":
    main()
