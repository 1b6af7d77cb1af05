"""For tests that run the real command line in a process of its own and signal or stop it
(tests/test_parallel.py, tests/test_resume.py): the command, the data arguments, /proc lookups."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from harness.checkpoint import STOP_AFTER_ENV

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = next((Path(p) for p in (os.environ.get("HARNESS_DATA"), REPO.parent / "shared" / "data")
                  if p and (Path(p) / "cifar10-jpeg.tar.gz").exists()), None)
SMOKE = ["--smoke", "--seeds", "0", *(["--data", str(DATA_ROOT)] if DATA_ROOT else [])]


def start(*argv, stop_after: int | None = None) -> subprocess.Popen:
    """`python -m harness *argv`, one torch thread; with `stop_after`, the process that writes its
    n-th checkpoint stops itself there (SIGSTOP), so a test acts at a known point, not after a sleep."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if stop_after:
        env[STOP_AFTER_ENV] = str(stop_after)
    return subprocess.Popen([sys.executable, "-m", "harness", *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _children(parent: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is `parent`."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            out.append((int(stat.parent.name), fields[0]))
    return out


def children(parent: int) -> list[int]:
    """The parent's live (not zombie) child processes."""
    return [pid for pid, state in _children(parent) if state != "Z"]


def stopped_child(parent: int, timeout: float = 300) -> int:
    """The pid of the parent's worker that stopped itself (state T in /proc), waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, state in _children(parent):
            if state == "T":
                return pid
        time.sleep(0.2)
    raise AssertionError("no worker stopped at its checkpoint")
