"""Serving under load: 32 concurrent clients against a lone request on the same server; int4/int8 vs fp32.

  .venv/bin/python benchmarks/bench_serve_load.py [--clients 32] [--rounds 3] [--requests-per-client 2]
      [--lone-requests N] [--max-tokens 32] [--threads 1] [--run-dir RUN] [--skip-quant] [--skip-distill]

1. load. One server process (`python -m scalelab.serve serve RUN --max-batch 32`, 127.0.0.1, response
   and prefix caches off). Each of `--rounds` rounds runs, back to back, (a) `--lone-requests` requests
   one at a time (nothing else in flight) and (b) `--clients` concurrent clients each sending
   `--requests-per-client` requests. Every request has its own prompt and seed and asks for exactly
   `--max-tokens` tokens (`ignore_eos`: the end-of-document token does not stop it, so every request
   does the same work). Reported per round and as min/median/max over rounds:
     serve_load_p99_latency_vs_lone: p99 latency under load / p99 of a lone request (goal ≤ 2),
     serve_load_tokens_per_second_vs_unbatched: generated tokens/s under load / tokens/s of requests
       served one at a time (goal ≥ 4),
   with wall time, the CPU seconds of the server process and of this (client) process, the 1-minute load
   average, and where the time went on the server (`server`: mean queue wait, prefill and decode steps
   with their mean model-call seconds and batch, the engine's busy fraction — from its own histograms).
   Both phases send the same number of requests a round by default (clients × requests-per-client), so the two p99s
   are quantiles of equally many samples (with fewer than 100, the nearest-rank p99 is the largest, and
   the largest of 64 catches a machine hiccup more often than the largest of 12 did).
   Why the baseline is fair: the lone request and the loaded requests hit the same server process with
   the same flags and the same kind of request, in alternating phases of the same rounds, so drift
   (thermal, other load on the machine) hits both; no cache can serve either (caches off, distinct
   prompts and seeds); and "unbatched" is the real alternative — one request in flight at a time on
   that server — not a `--max-batch 1` server under the same 32-client queue, whose queueing would
   inflate the baseline's latency and flatter the ratio.
2. quantization (in process): serialized size, held-out loss and batch-32 decode tokens/s of int8 and
   int4 against fp32.
3. distillation: held-out loss of a distilled student vs the same student trained from scratch.
Prints one JSON line per figure: {name, value, baseline, ratio, unit, rounds, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import emit, emit_value, report


def pct(xs: list[float], p: float) -> float:
    """The p-quantile by nearest rank: the ceil(p·n)-th smallest (p99 of up to 100 samples is the largest)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))] if s else float("nan")


#: pooled connections idle longer than this are closed, not reused (uvicorn closes them after 5 s)
MAX_IDLE_SECONDS = 2.0


class RawHTTP:
    """Keep-alive HTTP/1.1 connections on raw asyncio streams, one per concurrent client.

    Why not httpx here: on this 2-core machine httpx spent ~3.5 ms of client CPU per request, so 32
    responses finishing together waited in the *client's* event loop for up to ~100 ms — latency the
    server never caused. This client spends tens of microseconds per request.
    """

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []  # + when last used

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        # a connection the server closed (its keep-alive timeout) or is about to close is not reused: one
        # closing just as a request went out failed a run (empty status line) when a slow lone phase
        # left the loaded phase's connections idle for ~5 s
        while self.idle and (
            self.idle[-1][0].at_eof() or time.monotonic() - self.idle[-1][2] > MAX_IDLE_SECONDS
        ):
            self.idle.pop()[1].close()
        reader, writer = self.idle.pop()[:2] if self.idle else await self._connect()
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        status_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await reader.readexactly(length)
        self.idle.append((reader, writer, time.monotonic()))
        return int(status_line.split()[1]), json.loads(payload)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()


async def requests_phase(
    client: RawHTTP, bodies: list[dict[str, Any]], concurrency: int
) -> tuple[list[float], int, float]:
    """Send `bodies` with `concurrency` in flight; (latencies, generated tokens, wall seconds)."""
    latencies: list[float] = []
    tokens = 0
    queue = list(reversed(bodies))

    async def worker() -> None:
        nonlocal tokens
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            status, answer = await client.post("/v1/generate", body)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {answer}")
            tokens += answer["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, tokens, time.perf_counter() - t0


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's /metrics samples as {(name, labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def breakdown(before: dict[Any, float], after: dict[Any, float], wall: float) -> dict[str, float]:
    """Where a phase's time went, from the server's own histograms (differences over the phase): mean
    queue wait (submit → slot), mean server-side request time, prefill and decode steps (count, mean
    seconds of the model call, mean batch) and the fraction of the wall time the engine spent in them."""

    def d(name: str, **labels: str) -> float:
        key = (f"scalelab_serve_{name}", tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    def mean(name: str, **labels: str) -> float:
        n = d(f"{name}_count", **labels)
        return d(f"{name}_sum", **labels) / n if n else 0.0

    out = {
        "queue_wait_mean_seconds": mean("queue_wait_seconds"),
        "server_request_mean_seconds": mean("request_latency_seconds", route="/v1/generate"),
        "prefill_steps": d("step_seconds_count", kind="prefill"),
        "prefill_step_mean_seconds": mean("step_seconds", kind="prefill"),
        "prefill_batch_mean": mean("prefill_batch_size"),
        "decode_steps": d("step_seconds_count", kind="decode"),
        "decode_step_mean_seconds": mean("step_seconds", kind="decode"),
        "decode_batch_mean": mean("decode_batch_size"),
    }
    busy = d("step_seconds_sum", kind="prefill") + d("step_seconds_sum", kind="decode")
    out["engine_model_busy_fraction"] = busy / wall if wall else 0.0
    return out


def bench_load(run_dir: Path, args: argparse.Namespace) -> None:
    import psutil

    from scalelab.serve._testing import serve_process

    counter = iter(range(10**9))

    def bodies(n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            i = next(counter)
            out.append(
                {
                    "prompt": f"def f{i}(x{i % 7}, ",
                    "max_tokens": args.max_tokens,
                    "temperature": 1.0,
                    "seed": i,
                    "ignore_eos": True,
                }
            )
        return out

    flags = ["--max-batch", "32", "--threads", str(args.threads), "--max-queue", "1024"]
    flags += ["--response-cache-mb", "0", "--prefix-cache-mb", "0"]
    rounds: list[dict[str, Any]] = []
    with serve_process(run_dir, *flags) as (url, proc):
        server_ps = psutil.Process(proc.pid)

        async def main() -> None:
            client = RawHTTP(url)
            try:
                await requests_phase(client, bodies(args.clients), args.clients)  # warm-up, both shapes
                await requests_phase(client, bodies(4), 1)
                for _ in range(args.rounds):
                    row: dict[str, Any] = {}
                    for phase, n, conc in (
                        ("lone", args.lone_requests or args.clients * args.requests_per_client, 1),
                        ("load", args.clients * args.requests_per_client, args.clients),
                    ):
                        metrics0 = scrape(url)
                        cpu_s0, cpu_c0 = sum(server_ps.cpu_times()[:2]), time.process_time()
                        lat, tokens, wall = await requests_phase(client, bodies(n), conc)
                        cpu_s1, cpu_c1 = sum(server_ps.cpu_times()[:2]), time.process_time()
                        row[phase] = {
                            "p50_seconds": pct(lat, 0.5),
                            "p99_seconds": pct(lat, 0.99),
                            "tokens_per_second": tokens / wall,
                            "requests": len(lat),
                            "wall_seconds": wall,
                            "server_cpu_seconds": cpu_s1 - cpu_s0,
                            "client_cpu_seconds": cpu_c1 - cpu_c0,
                            "loadavg_1min": os.getloadavg()[0],
                            "server": breakdown(metrics0, scrape(url), wall),
                        }
                    rounds.append(row)
            finally:
                client.close()

        asyncio.run(main())

    def side(phase: str, key: str) -> list[float]:
        return [r[phase][key] for r in rounds]

    def per_cpu(phase: str) -> list[float]:
        return [
            r[phase]["tokens_per_second"]
            * r[phase]["wall_seconds"]
            / (r[phase]["server_cpu_seconds"] + r[phase]["client_cpu_seconds"])
            for r in rounds
        ]

    common = {"clients": args.clients, "max_tokens": args.max_tokens, "per_round": rounds}
    for name, key, unit, higher, goal in (
        ("serve_load_p99_latency_vs_lone", "p99_seconds", "seconds", False, "ratio <= 2"),
        ("serve_load_tokens_per_second_vs_unbatched", "tokens_per_second", "tokens/s", True, "ratio >= 4"),
    ):
        load, lone = side("load", key), side("lone", key)
        cpu = {"cpu_values": per_cpu("load"), "cpu_baselines": per_cpu("lone")} if higher else {}
        emit(
            report(
                name,
                load,
                lone,
                unit,
                paired=[a / b for a, b in zip(load, lone, strict=True)],
                higher_is_better=higher,
                goal=goal,
                baseline_name=f"lone requests (concurrency 1) to the same server, alternating with {args.clients} clients",
                **cpu,
                **common,
            )
        )


def bench_quant(run_dir: Path, args: argparse.Namespace) -> None:
    from scalelab.serve.engine import Engine, Job
    from scalelab.serve.loading import load_run
    from scalelab.serve.quantize import quantization_report, quantize_model
    from scalelab.serve.sampling import SamplingParams

    run = load_run(run_dir)
    eod = run.tokenizer.eod_id
    modes = ("fp32", "int8", "int4")
    models = {m: run.model if m == "fp32" else quantize_model(run.model, m) for m in modes}
    speed: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):  # interleaved rounds
        for name, model in models.items():
            engine = Engine(model, max_batch=32)  # type: ignore[arg-type]
            jobs = [
                Job("generate", [eod, 100 + i % 50, 40], SamplingParams(args.max_tokens, 1.0, None, i))
                for i in range(32)
            ]
            t0 = time.perf_counter()
            engine.admit(jobs)
            while engine.active:
                engine.decode()
            speed[name].append(sum(len(j.generated) for j in jobs) / (time.perf_counter() - t0))
    for mode in ("int8", "int4"):
        rep = quantization_report(run_dir, mode)
        emit(
            report(
                f"serve_{mode}_decode_tokens_per_second_vs_fp32",
                speed[mode],
                speed["fp32"],
                "tokens/s",
                batch=32,
                baseline_name="the same engine on the fp32 model, interleaved",
            )
        )
        emit_value(
            f"serve_{mode}_size_bytes_vs_fp32",
            rep["quantized_size_bytes"],
            rep["fp32_size_bytes"],
            "bytes",
            rounds=1,
        )
        emit_value(
            f"serve_{mode}_heldout_loss_vs_fp32",
            rep["quantized_heldout_loss"],
            rep["fp32_heldout_loss"],
            "nats/token",
            loss_delta=rep["loss_delta"],
            within_tolerance=rep["within_tolerance"],
            rounds=1,
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
    emit_value(
        "distill_student_heldout_loss_vs_scratch",
        rep["student_eval_loss"],
        rep["scratch_eval_loss"],
        "nats/token",
        teacher=rep["teacher_eval_loss"],
        tokens=rep["tokens"],
        rounds=1,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--lone-requests", type=int, help="default: clients × requests-per-client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run-dir", type=Path, help="serve this trained run instead of training the tiny one")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-quant", action="store_true")
    ap.add_argument("--skip-distill", action="store_true")
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be at least 3")
    missing = [
        m for m in ("fastapi", "uvicorn", "httpx", "prometheus_client") if importlib.util.find_spec(m) is None
    ]
    if missing:
        print(f"skipping: the serve extra is not installed (missing {', '.join(missing)})", file=sys.stderr)
        return
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="scalelab-bench-serve-"))
    os.environ["SCALELAB_CACHE_DIR"] = str(root / "cache")
    from scalelab.serve._testing import train_tiny_run

    t0 = time.perf_counter()
    run_dir = args.run_dir or train_tiny_run(
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
    if not args.skip_load:
        bench_load(run_dir, args)
    if not args.skip_quant:
        bench_quant(run_dir, args)
    if not args.skip_distill:
        bench_distill(run_dir, root, args)


if __name__ == "__main__":
    main()
