"""`scalelab serve` as a process: binds to loopback, answers, and refuses a public address unless asked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from scalelab.serve._testing import train_tiny_run  # noqa: E402
from scalelab.serve.commands import register  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELAB_CACHE_DIR", str(root / "cache"))
        yield train_tiny_run(root, **{"train.tokens": 8 * 64 * 10})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_process_answers_on_loopback(run_dir: Path) -> None:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "scalelab.serve",
        "serve",
        str(run_dir),
        "--port",
        str(port),
        "--threads",
        "1",
    ]
    proc = subprocess.Popen([*cmd, "--quantize", "int8", "--max-batch", "4"], env=env, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                health = httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        assert health.json()["quantize"] == "int8"
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "To: ", "max_tokens": 5, "seed": 1}, timeout=10)
        assert r.status_code == 200 and 0 < r.json()["usage"]["completion_tokens"] <= 5
        assert "scalelab_serve_generated_tokens_total" in httpx.get(f"{url}/metrics", timeout=5).text
    finally:
        proc.terminate()
        proc.wait(15)


def test_public_bind_needs_allow_remote(run_dir: Path) -> None:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["serve", str(run_dir), "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "--allow-remote" in str(result.exception)
    missing = CliRunner().invoke(app, ["serve", str(run_dir.parent / "nope"), "--port", "0"])
    assert missing.exit_code != 0 and "config.json" in str(missing.exception)
