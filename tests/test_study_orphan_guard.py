"""A training subprocess dies with its study driver, and the driver's fork runs no Python code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from scalelab.study.executors import guarded

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

DRIVER = """
import subprocess, sys, time
from scalelab.study.executors import guarded
p = subprocess.Popen(guarded(["sleep", "60"]), start_new_session=True)
print(p.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_child_dies_when_the_driver_is_killed():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    child = int(driver.stdout.readline())
    deadline = time.time() + 10
    while time.time() < deadline and "sleep" not in open(f"/proc/{child}/cmdline").read():
        time.sleep(0.05)  # the guard has exec'd the command
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)


def test_guard_refuses_when_its_parent_is_not_the_driver():
    out = subprocess.run(guarded(["true"])[:3] + [str(os.getpid() + 1), "--", "true"], timeout=30)
    assert out.returncode == 125
    assert subprocess.run(guarded(["true"]), timeout=30).returncode == 0
