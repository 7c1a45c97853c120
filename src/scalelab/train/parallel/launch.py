"""`scalelab launch`: build and run the torchrun (`python -m torch.distributed.run`) command of a run.

torchrun starts K copies of `scalelab train CONFIG --out DIR` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*
set; `run_training` sees a ddp/fsdp strategy and trains as one rank of the group. Rendezvous is c10d on
127.0.0.1 (or `rdzv_endpoint`) so that `--nnodes MIN:MAX` elastic jobs and `--max-restarts N` work: after
a worker dies, torchrun restarts the whole group, and `scalelab train` resumes from the newest committed
checkpoint (`--resume` is the default).

Elastic membership (`--nnodes MIN:MAX`, one agent per node): an agent joining makes the running agents
restart their workers at the larger world size; an agent that dies (its node gone) fails the others'
collectives, and those agents restart (this needs `--max-restarts` ≥ 1) into a round the dead agent is
dropped from once its keep-alive expires (rdzv_conf `keep_alive_interval` × `keep_alive_max_attempt`,
5 s × 3 by default), closing `last_call_timeout` after MIN agents are in. The c10d rendezvous store lives
in the process of one agent (the first to bind the endpoint, or the one given `is_host=1`): the job
survives the loss of any agent but that one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from scalelab.errors import DistributedError

#: environment for torchrun. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: in torch 2.13 an agent that keeps its
#: shared TCPStore across rendezvous rounds does not publish MASTER_ADDR for a later round, so an agent
#: joining an elastic job (--nnodes MIN:MAX) waits for it until the store times out ("wait timeout …
#: /torch.rendezvous.<id>.1/MASTER_ADDR"). Without sharing, rank 0 of each round hosts a fresh store.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with `TORCHRUN_ENV` added."""
    return {**(dict(os.environ) if base is None else base), **TORCHRUN_ENV}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for the rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def torchrun_command(
    config: Path | str,
    out: Path | str,
    *,
    nproc: int,
    overrides: Sequence[str] = (),
    max_restarts: int = 0,
    nnodes: str = "1",
    rdzv_endpoint: str | None = None,
    rdzv_conf: str | None = None,
    resume: bool = True,
    python: str | None = None,
) -> list[str]:
    """The argv that runs `scalelab train CONFIG --out OUT` on `nproc` ranks per node under torchrun.

    `nnodes` "MIN:MAX" makes the job elastic: agents joining later (same `rdzv_endpoint`) make torchrun
    restart the group at the new world size. `rdzv_conf` is passed through (e.g. "last_call_timeout=2"
    to close an elastic rendezvous sooner than torchrun's default).
    """
    if nproc < 1:
        raise DistributedError(f"--nproc must be at least 1, got {nproc}")
    if max_restarts < 0:
        raise DistributedError(f"--max-restarts must be non-negative, got {max_restarts}")
    parts = nnodes.split(":")
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise DistributedError(f"--nnodes must be N or MIN:MAX with positive integers, got {nnodes!r}")
    endpoint = rdzv_endpoint or f"127.0.0.1:{free_port()}"
    argv = [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--nnodes",
        nnodes,
        "--max-restarts",
        str(max_restarts),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        *(["--rdzv-conf", rdzv_conf] if rdzv_conf else []),
        "-m",
        "scalelab",
        "train",
        str(config),
        "--out",
        str(out),
        "--resume" if resume else "--no-resume",
    ]
    for item in overrides:
        argv += ["--set", item]
    return argv


def launch(argv: Sequence[str]) -> int:
    """Run the torchrun command in the foreground; its exit code (0: every rank finished the run)."""
    return subprocess.run(list(argv), env=torchrun_env(), check=False).returncode
