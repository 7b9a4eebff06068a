"""Workers killed while records flow lose nothing: every input decided, same commands, one effect each."""

from __future__ import annotations

import signal

import pytest

from concord.tools.chaos import Campaign

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_sigkill_mid_flow_loses_no_decision_and_applies_each_command_once(broker, tmp_path):
    camp = Campaign(broker.bootstrap_servers, tmp_path, customers=30, days=12, seed=21, workers=1)
    result = camp.run(kills=3, sig=signal.SIGKILL, adapter_kills=1, rate=25.0)
    assert result.kills == 3 and result.kills_mid_flow >= 2, result  # the kills landed while records flowed
    assert result.expected_commands > 20
    assert (result.lost, result.spurious, result.undecided) == (0, 0, 0), result
    assert (result.duplicate_effects, result.missing_effects) == (0, 0), result
    assert result.status_mismatch == 0 and result.crashed == 0, result


def test_two_workers_survive_a_member_killed_and_a_member_stopped(broker, tmp_path):
    camp = Campaign(broker.bootstrap_servers, tmp_path, customers=24, days=12, seed=22, workers=2)
    killed = camp.run(kills=2, sig=signal.SIGKILL, adapter_kills=0, rate=25.0)
    assert killed.kills_mid_flow >= 1, killed
    assert (killed.lost, killed.spurious, killed.undecided, killed.status_mismatch) == (0, 0, 0, 0), killed
    assert killed.crashed == 0, killed  # the surviving worker took over the partitions without crashing
