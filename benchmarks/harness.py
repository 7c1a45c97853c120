"""Shared benchmark harness: interleaved A/B rounds, wall and CPU time, machine load, one JSON line a result.

A side is a callable returning a `Sample` (work done, wall seconds, CPU seconds). `compare` runs the
candidate and the baseline alternately (A B, B A, A B, …) for at least `rounds` rounds, and on until the
paired wall ratios' spread ((max − min) / median) is within `spread` or `max_rounds` is reached, so a
change in the machine's load hits both sides. Rates are work per wall second and work per CPU second
(`cpu_seconds`: this process, its waited-for children and its live descendants). Where start-up matters a
side is `fresh_process(argv)`: the command runs in a new interpreter and the parent times all of it.
Where start-up is not what is claimed but the sides must not share a process, a side is a long-lived
child asked for one round at a time (`ServedSide` + `serve_rounds`, or `SpawnedGroup` for W ranks).

`emit` prints one JSON line per result —
  {name, value, baseline, ratio, unit, rounds, cpu_ratio, load, higher_is_better,
   value_min/median/max, baseline_min/median/max, cpu_value_*, cpu_baseline_*, paired_ratios, ...}
(value/baseline are medians; ratio is value/baseline, >1 is better unless higher_is_better is false);
`benchmarks/run_all.py` (`make bench`) collects every such line on stdout into one table.
Benchmarks that time their own loops report lists of rates through `report`.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One timed run of a side: `work` units (tokens, bytes, steps…) in `wall` and `cpu` seconds."""

    work: float
    wall: float
    cpu: float


Side = Callable[[], Sample]


def load() -> float:
    """The machine's 1-minute load average (0.0 where the OS does not report it)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, its waited-for children and its live descendants.

    A live descendant counts through psutil (with its own waited-for children); once it exits and is
    waited for, its time moves into RUSAGE_CHILDREN, so deltas stay consistent across exits.
    """
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    try:
        import psutil
    except ImportError:
        return total
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def timed(fn: Callable[[], float]) -> Sample:
    """Runs `fn` (which returns the work it did) in this process and times it."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    work = fn()
    return Sample(work, time.perf_counter() - t0, cpu_seconds() - c0)


class CpuMeter:
    """CPU seconds (user + system) of this process and all its descendants while it runs.

    Workers of a forkserver are not our children's waited-for children, so `RUSAGE_CHILDREN` never sees
    them: a thread polls psutil every `interval` seconds and keeps each descendant's last reading (a
    process's last `interval` before it exits can be missed). Descendants already running at the start
    count from then on.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        import psutil

        self._me = psutil.Process()
        self._interval = interval
        self._seen: dict[int, float] = {}
        self._t0 = self._total(self._me)
        self._start: dict[int, float] = {}
        for child in self._me.children(recursive=True):
            try:
                self._start[child.pid] = self._seen[child.pid] = self._total(child)
            except psutil.Error:
                pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def _total(p: Any) -> float:
        t = p.cpu_times()
        return float(t.user + t.system)

    def _poll(self) -> None:
        import psutil

        while not self._stop.wait(self._interval):
            for child in self._me.children(recursive=True):
                try:
                    self._seen[child.pid] = self._total(child)
                except psutil.Error:
                    pass

    def stop(self) -> float:
        """The CPU seconds since the start; stops polling."""
        self._stop.set()
        self._thread.join()
        own = self._total(self._me) - self._t0
        return own + sum(t - self._start.get(pid, 0.0) for pid, t in self._seen.items())


def fresh_process(argv: Sequence[str], work: float, env: dict[str, str] | None = None) -> Side:
    """A side that runs `argv` in a new process, timing all of it (start-up included); CPU time is the
    whole process tree's (`CpuMeter`), grandchildren of a forkserver included."""

    def run() -> Sample:
        t0, meter = time.perf_counter(), CpuMeter()
        proc = subprocess.run(list(argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - t0
        sample = Sample(work, wall, meter.stop())
        if proc.returncode:
            raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr.decode(errors='replace')}")
        return sample

    return run


def side_in_subprocess(argv: Sequence[str], env: dict[str, str] | None = None) -> Side:
    """A side that runs `argv` in a new process which times itself and prints its Sample as the last line
    of stdout (see `print_sample`): for sides whose set-up should not count but whose state must not leak
    into the other side."""

    def run() -> Sample:
        proc = subprocess.run(list(argv), env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
        last = json.loads(proc.stdout.strip().splitlines()[-1])
        return Sample(float(last["work"]), float(last["wall"]), float(last["cpu"]))

    return run


class SpawnedGroup:
    """`world` spawned processes that live across rounds (start-up and connection set-up are not what is
    measured): ``target(rank, world, store_path, go, replies, *args)`` loops on ``go.get()`` until it gets
    None, putting one ``(rank, ...)`` reply on `replies` per message. Calling the group sends `message` to
    every rank and returns the replies sorted by rank."""

    def __init__(self, target: Callable[..., None], world: int, *args: Any) -> None:
        import multiprocessing as mp
        import tempfile

        ctx = mp.get_context("spawn")
        self.replies = ctx.Queue()
        self.go = [ctx.Queue() for _ in range(world)]
        store = os.path.join(tempfile.mkdtemp(prefix="scalelab-bench-"), "store")
        self.procs = [
            ctx.Process(target=target, args=(r, world, store, self.go[r], self.replies, *args))
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def __call__(self, message: Any = True, timeout: float = 900) -> list[tuple]:
        import queue

        for g in self.go:
            g.put(message)
        got: list[tuple] = []
        deadline = time.monotonic() + timeout
        while len(got) < len(self.go):
            try:
                got.append(self.replies.get(timeout=1.0))
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close(kill=True)
                    why = f"rank exited with {dead[0].exitcode}" if dead else f"no reply in {timeout:g} s"
                    raise SystemExit(f"spawned group: {why}") from None
        return sorted(got)

    def close(self, kill: bool = False) -> None:
        for g in self.go:
            g.put(None)
        for p in self.procs:
            if kill:
                p.kill()
            p.join()


class ServedSide:
    """A side served by one long-lived child process (`serve_rounds` at its end): built once, so its
    set-up (compilation, warm-up) stays out of the rounds and out of the other sides' processes; each
    call asks the child for one round and reads back the Sample it timed."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._read()  # the child's "ready" line: built and warmed up

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"{' '.join(self.argv)} exited with {self.proc.wait()}")

    def __call__(self) -> Sample:
        assert self.proc.stdin is not None
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        got = self._read()
        return Sample(float(got["work"]), float(got["wall"]), float(got["cpu"]))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def serve_rounds(one_round: Side) -> None:
    """The child's end of `ServedSide`: says it is ready, then runs and prints one round per stdin line."""
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        print_sample(one_round())


def print_sample(sample: Sample) -> None:
    """The last stdout line of a `side_in_subprocess` child."""
    print(json.dumps({"work": sample.work, "wall": sample.wall, "cpu": sample.cpu}), flush=True)


def spread(xs: Sequence[float]) -> float:
    """(max − min) / median: 0 for identical values."""
    m = median(xs)
    return (max(xs) - min(xs)) / m if m else float("inf")


def min_median_max(prefix: str, xs: Sequence[float]) -> dict[str, float]:
    """{prefix_min, prefix_median, prefix_max} of `xs`."""
    return {f"{prefix}_min": min(xs), f"{prefix}_median": median(xs), f"{prefix}_max": max(xs)}


def compare(
    name: str,
    candidate: Side,
    baseline: Side,
    unit: str,
    *,
    rounds: int = 3,
    spread_target: float | None = None,
    max_rounds: int = 9,
    warmup: bool = False,
    baseline_scale: float = 1.0,
    **extra: Any,
) -> dict[str, Any]:
    """Interleaved rounds of `candidate` against `baseline`; the result dict (see the module docstring).

    `unit` is the unit of work per second (e.g. "tokens/s"); CPU rates are the same work per CPU second.
    With `warmup`, each side runs once untimed first. `baseline_scale` multiplies the baseline's wall
    rates only (e.g. W × one process's tokens/s, so that the ratio is a scaling efficiency).
    """
    if warmup:
        candidate(), baseline()
    a: list[Sample] = []
    b: list[Sample] = []
    loads: list[float] = []
    r = 0
    while r < rounds or (
        spread_target is not None and r < max_rounds and spread(_paired(a, b)) > spread_target
    ):
        for side in (candidate, baseline) if r % 2 == 0 else (baseline, candidate):
            (a if side is candidate else b).append(side())
            loads.append(load())
        r += 1
    return report(
        name,
        [s.work / s.wall for s in a],
        [baseline_scale * s.work / s.wall for s in b],
        unit,
        cpu_values=[s.work / s.cpu for s in a if s.cpu > 0],
        cpu_baselines=[s.work / s.cpu for s in b if s.cpu > 0],
        loads=loads,
        paired=[p / baseline_scale for p in _paired(a, b)],
        **extra,
    )


def _paired(a: Sequence[Sample], b: Sequence[Sample]) -> list[float]:
    return [(x.work / x.wall) / (y.work / y.wall) for x, y in zip(a, b, strict=False)]


def report(
    name: str,
    values: Sequence[float],
    baselines: Sequence[float],
    unit: str,
    *,
    cpu_values: Sequence[float] = (),
    cpu_baselines: Sequence[float] = (),
    loads: Sequence[float] = (),
    paired: Sequence[float] = (),
    higher_is_better: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """The result dict of measured rounds (medians as value/baseline, min/median/max of each)."""
    value, base = median(values), median(baselines)
    out: dict[str, Any] = {
        "name": name,
        "value": value,
        "baseline": base,
        "ratio": value / base if base else float("nan"),
        "unit": unit,
        "rounds": min(len(values), len(baselines)),
        "cpu_ratio": None,
        "load": list(loads) or [load()],
        "cpus": os.cpu_count(),
        "higher_is_better": higher_is_better,
        **min_median_max("value", values),
        **min_median_max("baseline", baselines),
    }
    if cpu_values and cpu_baselines:
        out["cpu_ratio"] = median(cpu_values) / median(cpu_baselines)
        out |= min_median_max("cpu_value", cpu_values) | min_median_max("cpu_baseline", cpu_baselines)
        out["cpu_unit"] = unit.replace("/s", "/CPU-s")
    if paired:
        out["paired_ratios"] = list(paired)
    return out | extra


def measured(
    name: str,
    value: float,
    baseline: float | None,
    unit: str,
    *,
    values: Sequence[float] = (),
    baselines: Sequence[float] = (),
    higher_is_better: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """The result of a figure that is not a rate over interleaved rounds (a size, an error, a count, a
    memory peak, a time measured once): `values` / `baselines` are its rounds where it has several
    (min/median/max of those, else of the one figure); `cpu_ratio` is None (no CPU time was compared)."""
    vs = list(values) or [value]
    bs = list(baselines) or ([] if baseline is None else [baseline])
    out: dict[str, Any] = {
        "name": name,
        "value": value,
        "baseline": baseline,
        "ratio": value / baseline if baseline else float("nan"),
        "unit": unit,
        "rounds": len(vs),
        "cpu_ratio": None,
        "load": [load()],
        "cpus": os.cpu_count(),
        "higher_is_better": higher_is_better,
        **min_median_max("value", vs),
    }
    if bs:
        out |= min_median_max("baseline", bs)
    return out | extra


#: the fields every result line carries (`missing_fields`); `skip` lines carry name, skipped and load
FIELDS = ("name", "value", "baseline", "ratio", "unit", "rounds", "cpu_ratio", "load")
FIELDS += tuple(f"{k}_{s}" for k in ("value", "baseline") for s in ("min", "median", "max"))


def missing_fields(result: dict[str, Any]) -> list[str]:
    """The harness fields `result` lacks (a figure without a baseline lacks only the baseline range)."""
    if "skipped" in result or "failed" in result:
        return [f for f in ("name", "load") if f not in result and "failed" not in result]
    optional = (
        {f"baseline_{s}" for s in ("min", "median", "max")} if result.get("baseline") is None else set()
    )
    return [f for f in FIELDS if f not in result and f not in optional]


def skip(name: str, reason: str) -> dict[str, Any]:
    """The line of a benchmark that cannot run here (no GPU, optional package missing)."""
    return {"name": name, "skipped": reason, "load": [load()]}


def emit(result: dict[str, Any]) -> None:
    """Prints `result` as one JSON line on stdout."""
    print(json.dumps(result, default=str), flush=True)


def emit_value(name: str, value: float, baseline: float | None, unit: str, **extra: Any) -> None:
    """Prints the line of one measured figure (`measured`)."""
    emit(measured(name, value, baseline, unit, **extra))


def here() -> Path:
    """The benchmarks directory (for sibling imports and subprocess sides)."""
    return Path(__file__).resolve().parent


def python(script: str, *args: str) -> list[str]:
    """argv running benchmarks/`script` with this interpreter."""
    return [sys.executable, str(here() / script), *args]
