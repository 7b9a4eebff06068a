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


def test_terminate_asks_first_then_kills_what_ignores_it():
    import signal

    from concord.runtime.broker import terminate

    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    terminate(polite, timeout=10)
    assert polite.returncode == -signal.SIGTERM
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(flush=True)\ntime.sleep(60)"],
                                stdout=subprocess.PIPE)
    stubborn.stdout.readline()  # its handler is in place
    terminate(stubborn, timeout=0.5)
    assert stubborn.returncode == -signal.SIGKILL
    terminate(stubborn)  # an ended process: nothing to do, no error
    terminate(None)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_terminate_with_group_ends_the_childs_own_children_too():
    from concord.runtime.broker import terminate

    code = "import subprocess, time\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid, flush=True)\ntime.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    grandchild = int(parent.stdout.readline())
    terminate(parent, timeout=10, group=True)
    deadline = time.monotonic() + 10
    while _state(grandchild) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(grandchild) in (None, "Z"), "the group's other process kept running"
