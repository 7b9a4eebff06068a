"""The simulator: the same seed gives the same history and the same injected losses in every process."""

from __future__ import annotations

import json
import subprocess
import sys

from concord.tools.simulator import LOSSES, Simulator

_LOSSES = ("import json; from concord.tools.simulator import Simulator, LOSSES; "
           "s = Simulator(customers=60, days=10, seed=7, faults=LOSSES); h = s.history(); "
           "print(json.dumps([len(h), s.injected], sort_keys=True))")


def test_same_seed_loses_the_same_things_in_another_process():
    # hash(None) is an address before Python 3.12, so a seed derived from a hash of it differs per process
    there = subprocess.run([sys.executable, "-c", _LOSSES], capture_output=True, text=True, check=True).stdout
    sim = Simulator(customers=60, days=10, seed=7, faults=LOSSES)
    here = [len(sim.history()), sim.injected]
    assert json.loads(there) == json.loads(json.dumps(here))
    assert sum(len(v) for v in sim.injected.values()) > 0, "the month lost nothing: the comparison proves nothing"
