"""Run a command that dies with its driver: `python -m scalelab.study.orphan_guard PARENT_PID -- CMD ...`.

Asks Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG survives the exec), checks
that the parent is still the driver that started it (else exits: the driver died first), then execs
CMD. Doing this in the child's own Python instead of a `preexec_fn` keeps the driver's fork free of
Python code: a `preexec_fn` makes CPython tidy up the other threads' state in the forked child, which
hung on a thread-local torch object (a gloo process group) left by an earlier in-process run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 125


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: python -m scalelab.study.orphan_guard PARENT_PID -- CMD [ARGS...]\n")
        raise SystemExit(2)
    parent = int(argv[0])
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL.value)
    except OSError:  # not glibc Linux: run unguarded
        pass
    if os.getppid() != parent:
        raise SystemExit(EXIT_PARENT_GONE)
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
