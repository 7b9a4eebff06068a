"""The replay benchmark runs on a small history and prints its one line (the figures themselves are make bench's)."""

import re

from concord.tools import bench_audit


def test_the_generated_history_has_exactly_n_distinct_events_across_batches():
    evs = list(bench_audit.history(900, batch=20))
    assert len(evs) == 900 and len({e["event_id"] for e in evs}) == 900
    assert len({e["event_id"].split("-", 1)[0] for e in evs}) > 1  # more than one batch of customers


def test_the_benchmark_prints_audit_eps_and_audit_rss_mb(capsys):
    assert bench_audit.main(["--events", "400"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"audit_eps=(\d+) audit_rss_mb=(\d+)", line)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0
