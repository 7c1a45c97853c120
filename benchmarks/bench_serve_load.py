"""Serving under load: dynamic batching vs one request at a time, int8 vs fp32, distilled vs scratch.

Everything runs on this machine, on loopback, bounded in requests and time. A small byte-level GPT is
trained first (seconds), then:
  1. load: the server (`python -m scalelab.serve serve RUN --max-batch B`, a subprocess on 127.0.0.1)
     gets `--clients` concurrent clients, each sending `--requests-per-client` generate requests of
     `--max-tokens` tokens (distinct seeds, so no response-cache hits), once with `--max-batch 32` and
     once with `--max-batch 1` — the same requests, so the same tokens. Reported: generated tokens/s
     (goal: ratio ≥ 4) and p50/p99 request latency.
  2. int8: decode tokens/s of the engine (in process, batch of 32, no HTTP) and serialized size, int8
     vs fp32, and the held-out loss change.
  3. distillation: held-out loss of a distilled student vs the same student trained from scratch.
Prints JSON lines {name, value, baseline, ratio, unit}.

  .venv/bin/python benchmarks/bench_serve_load.py [--clients 32] [--requests-per-client 4] [--max-tokens 48]
      [--time-limit 120] [--skip-distill]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def emit(name: str, value: float, baseline: float, unit: str, **extra: Any) -> None:
    ratio = value / baseline if baseline else None
    print(
        json.dumps(
            {"name": name, "value": value, "baseline": baseline, "ratio": ratio, "unit": unit, **extra}
        ),
        flush=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    run_dir: Path, max_batch: int, threads: int, extra: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "scalelab.serve",
        "serve",
        str(run_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    cmd += [
        "--max-batch",
        str(max_batch),
        "--max-wait-ms",
        "5",
        "--threads",
        str(threads),
        "--max-queue",
        "1024",
    ]
    proc = subprocess.Popen([*cmd, *(extra or [])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become healthy in 60 s")


async def load(url: str, clients: int, per_client: int, max_tokens: int, time_limit: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    tokens = 0
    errors = 0
    deadline = time.monotonic() + time_limit
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker(c: int) -> None:
            nonlocal tokens, errors
            for r in range(per_client):
                if time.monotonic() > deadline:
                    return
                body = {
                    "prompt": f"def f{c}_{r}(",
                    "max_tokens": max_tokens,
                    "temperature": 1.0,
                    "seed": 1000 * c + r,
                }
                t0 = time.perf_counter()
                resp = await client.post("/v1/generate", json=body)
                latencies.append(time.perf_counter() - t0)
                if resp.status_code != 200:
                    errors += 1
                    continue
                tokens += resp.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    return {
        "tokens": tokens,
        "requests": len(latencies),
        "errors": errors,
        "wall_seconds": wall,
        "tokens_per_second": tokens / wall,
        "p50": pct(0.50),
        "p99": pct(0.99),
    }


def bench_load(run_dir: Path, args: argparse.Namespace) -> None:
    results = {}
    for max_batch in (32, 1):
        proc, url = start_server(run_dir, max_batch, args.threads)
        try:
            asyncio.run(load(url, min(4, args.clients), 1, 4, 30))  # warm-up
            results[max_batch] = asyncio.run(
                load(url, args.clients, args.requests_per_client, args.max_tokens, args.time_limit)
            )
        finally:
            proc.terminate()
            proc.wait(10)
    dyn, one = results[32], results[1]
    common = {
        "clients": args.clients,
        "requests": [dyn["requests"], one["requests"]],
        "errors": [dyn["errors"], one["errors"]],
    }
    emit(
        "serve_load_tokens_per_second_maxbatch32_vs_1",
        dyn["tokens_per_second"],
        one["tokens_per_second"],
        "tokens/s",
        **common,
    )
    emit("serve_load_p99_latency_maxbatch32_vs_1", dyn["p99"], one["p99"], "seconds", **common)
    emit("serve_load_p50_latency_maxbatch32_vs_1", dyn["p50"], one["p50"], "seconds", **common)


def bench_int8(run_dir: Path, args: argparse.Namespace) -> None:
    from scalelab.serve.engine import Engine, Job
    from scalelab.serve.loading import load_run
    from scalelab.serve.quantize import quantization_report, quantize_model
    from scalelab.serve.sampling import SamplingParams

    run = load_run(run_dir)
    models = {"fp32": run.model, "int8": quantize_model(run.model, "int8")}
    eod = run.tokenizer.eod_id
    speed = {}
    for name, model in models.items():
        best = 0.0
        for _ in range(3):
            engine = Engine(model, max_batch=32)  # type: ignore[arg-type]
            jobs = [
                Job("generate", [eod, 100 + i % 50, 40], SamplingParams(args.max_tokens, 1.0, None, i))
                for i in range(32)
            ]
            t0 = time.perf_counter()
            engine.admit(jobs)
            while engine.active:
                engine.decode()
            best = max(best, sum(len(j.generated) for j in jobs) / (time.perf_counter() - t0))
        speed[name] = best
    rep = quantization_report(run_dir, "int8")
    emit("serve_int8_decode_tokens_per_second_vs_fp32", speed["int8"], speed["fp32"], "tokens/s", batch=32)
    emit("serve_int8_size_bytes_vs_fp32", rep["quantized_size_bytes"], rep["fp32_size_bytes"], "bytes")
    emit(
        "serve_int8_heldout_loss_vs_fp32",
        rep["quantized_heldout_loss"],
        rep["fp32_heldout_loss"],
        "nats/token",
        within_tolerance=rep["within_tolerance"],
    )


STUDENT = """
[model]
n_heads = 2
width = 32
depth = 1
context_tokens = 128
[train]
tokens = {tokens}
global_batch_size = 8
lr = 1e-2
eval_interval_steps = 1000
eval_tokens = 8192
checkpoint_interval_steps = 1000
threads = {threads}
device = "cpu"
[distill]
temperature = 1.0
kl_weight = 0.8
ce_weight = 0.2
"""


def bench_distill(teacher: Path, root: Path, args: argparse.Namespace) -> None:
    from scalelab.serve.distill import distill

    cfg = root / "student.toml"
    cfg.write_text(STUDENT.format(tokens=8 * 128 * 60, threads=args.threads))
    rep = distill(teacher, cfg, root / "distill")
    emit(
        "distill_student_heldout_loss_vs_scratch",
        rep["student_eval_loss"],
        rep["scratch_eval_loss"],
        "nats/token",
        teacher=rep["teacher_eval_loss"],
        tokens=rep["tokens"],
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--time-limit", type=float, default=120.0, help="per load phase (seconds)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-distill", action="store_true")
    args = ap.parse_args()
    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"skipping: the serve extra is not installed (missing {', '.join(missing)})", file=sys.stderr)
        return
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="scalelab-bench-serve-"))
    os.environ["SCALELAB_CACHE_DIR"] = str(root / "cache")
    from scalelab.serve._testing import train_tiny_run

    t0 = time.perf_counter()
    run_dir = train_tiny_run(
        root,
        **{
            "model.width": 128,
            "model.context_tokens": 128,
            "train.tokens": 8 * 128 * 150,
            "train.eval_tokens": 8192,
            "train.threads": args.threads,
        },
    )
    print(f"trained the model in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    bench_load(run_dir, args)
    bench_int8(run_dir, args)
    if not args.skip_distill:
        bench_distill(run_dir, root, args)


if __name__ == "__main__":
    main()
