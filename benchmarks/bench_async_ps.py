"""Async parameter server vs DDP with one of two CPU workers slowed 2×: training tokens/s.

Prints one JSON line (harness.compare): value = `train.strategy = "async_ps"` (2 Ray worker actors, 1
server, max_staleness 2, worker 1 slowed by debug.slow_worker), baseline = DDP on 2 gloo processes whose
rank 1 sleeps (factor − 1) × its own step time after every step — the same 2× slowdown, the same spec, global
batch, model, data (on both sides every worker reads its own shard of the token store) and 1 torch
thread per process — so the ratio is what letting the fast worker run
ahead (stale gradients) buys over waiting for the slow one every step. A second line compares against
async_ps itself at max_staleness 0 (synchronous: every update waits for the slow worker), the same Ray
machinery, which separates the gain of staleness from the difference between the two implementations
(DDP's per-step cross-rank metrics and gloo collectives). Rounds interleave (A B, B A, …).
Rates are training tokens over training seconds (the records' tokens_per_second: process-group and actor
start-up excluded on both sides). CPU time is the harness's (this process and its live descendants, start-up
included); on the async side it misses the actors' own CPU (they are killed at the end of the run, before
it is read), so its cpu_ratio is not meaningful — compare wall rates only.

  python benchmarks/bench_async_ps.py [--width 128] [--depth 4] [--context 128] [--batch 16]
      [--steps 24] [--staleness 2] [--factor 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Sample, compare, cpu_seconds, emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_store(root: Path) -> Path:
    """A small real token store (byte tokenizer) from scalelab's own sources."""
    from scalelab.data.store import ensure_store
    from scalelab.spec import DataSpec, SourceSpec

    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted((ROOT / "src" / "scalelab").rglob("*.py"))[:40]):
        (corpus / f"doc{i:03d}.txt").write_text(f.read_text())
    spec = DataSpec(sources=[SourceSpec(kind="text", path=str(corpus))], heldout_fraction=0.05)
    return ensure_store(spec, cache_dir=root / "cache").path


def spec_data(args: argparse.Namespace, store: Path, strategy: str, staleness: int = 0) -> dict[str, Any]:
    heads = max(1, args.width // 32)
    data: dict[str, Any] = {
        "model": {"width": args.width, "depth": args.depth, "n_heads": heads, "context_tokens": args.context},
        "data": {"store": str(store)},
        "train": {
            "tokens": args.batch * args.context * args.steps,
            "global_batch_size": args.batch,
            "micro_batch_size": args.batch // 2,
            "threads": 1,
            "eval_interval_steps": 10_000,
            "eval_tokens": args.context,
            "checkpoint_interval_steps": 10_000,
            "strategy": strategy,
        },
    }
    if strategy == "async_ps":
        data["train"]["async_ps"] = {"workers": 2, "servers": 1, "max_staleness": staleness}
        data["debug"] = {"slow_worker": 1, "slow_factor": args.factor}
    return data


def async_side(args: argparse.Namespace, store: Path, work: Path, staleness: int) -> Any:
    from scalelab.spec import run_from_dict
    from scalelab.train.run import run_training

    def side() -> Sample:
        c0 = cpu_seconds()
        spec = run_from_dict(spec_data(args, store, "async_ps", staleness))
        record = run_training(spec, work / f"async{staleness}", resume=False)
        if record["status"] != "done":
            raise SystemExit(f"async_ps run failed: {record['error']}")
        return Sample(record["tokens"], record["tokens"] / record["tokens_per_second"], cpu_seconds() - c0)

    return side


def ddp_side(args: argparse.Namespace, store: Path, work: Path) -> Any:
    config = work / "ddp.json"
    config.write_text(json.dumps(spec_data(args, store, "ddp")))

    def side() -> Sample:
        c0 = cpu_seconds()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for rank in range(2):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            )
            argv = [
                sys.executable,
                __file__,
                "--ddp-rank",
                str(rank),
                "--config",
                str(config),
                "--out",
                str(work / "ddp"),
                "--factor",
                str(args.factor),
            ]
            procs.append(subprocess.Popen(argv, env=env))
        if any(p.wait(timeout=900) for p in procs):
            raise SystemExit("DDP baseline failed")
        record = json.loads((work / "ddp" / "record.json").read_text())
        return Sample(record["tokens"], record["tokens"] / record["tokens_per_second"], cpu_seconds() - c0)

    return side


def ddp_rank(args: argparse.Namespace) -> None:
    """One DDP rank (started by `ddp_side`); rank 1 is slowed `factor` ×."""
    from scalelab.spec import run_from_dict
    from scalelab.train.run import run_training
    from scalelab.train.trainer import Callback, TrainState

    class SlowRank(Callback):
        """Sleeps (factor − 1) × this rank's own time since its last sleep (state.step_seconds is the
        slowest rank's under DDP, and would feed the sleep back into itself)."""

        mark = time.perf_counter()

        def on_step_end(self, state: TrainState) -> None:
            time.sleep((args.factor - 1) * (time.perf_counter() - self.mark))
            self.mark = time.perf_counter()

    spec = run_from_dict(json.loads(Path(args.config).read_text()))
    slow = [SlowRank()] if args.ddp_rank == 1 else []
    record = run_training(spec, args.out, resume=False, callbacks=slow)
    raise SystemExit(0 if record["status"] == "done" else 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--staleness", type=int, default=2)
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ddp-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ddp_rank is not None:
        ddp_rank(args)
        return
    import ray

    with tempfile.TemporaryDirectory(prefix="bench_async_ps-") as tmp:
        work = Path(tmp)
        store = build_store(work)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        model = f"width {args.width} depth {args.depth} context {args.context} batch {args.batch}"
        stale = async_side(args, store, work, args.staleness)
        try:
            emit(
                compare(
                    "async_ps_vs_ddp_one_worker_slowed",
                    stale,
                    ddp_side(args, store, work),
                    "tokens/s",
                    rounds=args.rounds,
                    slow_factor=args.factor,
                    max_staleness=args.staleness,
                    model=model,
                )
            )
            # the same machinery at bound 0 (synchronous): how much of the gain is the staleness itself
            emit(
                compare(
                    "async_ps_vs_bound0_one_worker_slowed",
                    stale,
                    async_side(args, store, work, 0),
                    "tokens/s",
                    rounds=args.rounds,
                    slow_factor=args.factor,
                    max_staleness=args.staleness,
                    model=model,
                )
            )
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
