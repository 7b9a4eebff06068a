"""Processes Concord starts do not outlive the process that started them."""

import subprocess
import sys
import time
from pathlib import Path

import pytest


def _state(pid: int) -> str | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return None
    return next(line.split()[1] for line in lines if line.startswith("State:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_child_started_with_die_with_parent_ends_when_its_parent_is_killed():
    # what a demo SIGKILLed by a timeout leaves behind: its broker and workers must not keep running
    code = ("import subprocess, sys, time\n"
            "from concord.runtime.broker import die_with_parent\n"
            "p = subprocess.Popen(['sleep', '60'], preexec_fn=die_with_parent)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _state(child) not in (None, "Z"), "the child did not start"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while _state(child) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(child) in (None, "Z"), "the child outlived its parent"
