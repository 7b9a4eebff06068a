"""The reconciliation report's figures from records read back: on-time invoicing of clean flows, MTTR vs SLA."""

from concord.tools.report import Report, loop_lines

H = 3_600_000


def work(completed, issued, *faults):
    return {"completed_at": completed, "issued_at": issued, "faults": set(faults)}


def test_on_time_invoicing_counts_clean_flows_only_and_a_clean_job_never_invoiced_as_late():
    r = Report(on_time_hours=48, on_time_invoicing=0.5)
    r.work = {"j1": work(0, 47 * H), "j2": work(0, 48 * H), "j3": work(0, None), "j4": work(0, 60 * H),
              "j5": work(0, 1 * H, "duplicate"), "j6": work(0, 90 * H), "j7": work(None, None)}
    r.faulted_flows = {"j4": "late_invoice", "j6": "unbilled_job"}
    inv = r.invoicing()
    assert (inv["clean_flows"], inv["on_time"], inv["ratio"]) == (3, 2, 0.667)  # j1, j2 on time; j3 never invoiced
    assert inv["left_out"] == {"duplicate": 1, "late_invoice": 1, "unbilled_job": 1}
    assert inv["late_clean"] == ["j3"]
    assert r.kpi()["on_time_invoicing"] == 0.667 and r.kpi()["on_time_invoicing_all_flows"] == 0.5
    line = next(x for x in loop_lines(r) if x.startswith("on-time invoicing:"))
    assert inv["all_flows_ratio"] == 0.6  # j1, j2, j5 of j1, j2, j4, j5, j6
    assert "clean_flows=3 on_time=2 ratio=0.667" in line and "0.600 read back, 0.500 as the worker counted" in line


def life(owner, opened, closed, sla_s, state="resolved"):
    return {"owner": owner, "reason": "x", "state": state, "opened_at": opened, "closed_at": closed, "escalated": 0,
            "by": "concord", "updated_at": closed or opened, "entity_id": "e", "sla_deadline": opened + sla_s * 1000}


def test_mttr_per_owner_is_held_against_the_sla_of_what_it_resolved():
    r = Report()
    r.lives = {"a": life("finance", 0, 10_000, 20), "b": life("finance", 0, 30_000, 40),
               "c": life("revenue-ops", 0, 50_000, 10), "d": life("revenue-ops", 0, None, 1, state="open")}
    rows = r.by_owner()
    assert (rows["finance"]["mttr_s"], rows["finance"]["sla_s"], rows["finance"]["within_sla"]) == (20.0, 30.0, True)
    assert rows["finance"]["resolved_within_sla"] == 1.0
    assert (rows["revenue-ops"]["mttr_s"], rows["revenue-ops"]["sla_s"]) == (50.0, 10.0)
    assert rows["revenue-ops"]["within_sla"] is False and rows["revenue-ops"]["resolved_within_sla"] == 0.0
    line = next(x for x in loop_lines(r) if x.startswith("mttr against sla:"))
    assert line == ("mttr against sla: finance mttr_s=20.0 sla_s=30.0 within=yes; "
                    "revenue-ops mttr_s=50.0 sla_s=10.0 within=no")


def test_an_unbilled_job_not_found_says_whether_its_completion_ever_came_out_of_the_broker():
    r = Report(on_time_hours=48)
    r.injected = {"unbilled_job": ["j1", "j2"]}
    r.work = {"j1": work(5, None), "j2": work(None, None)}
    unbilled = r.unbilled()
    assert (unbilled["found"], unbilled["injected"]) == (0, 2)
    assert unbilled["missed"] == {"j1": "completed, yet no unbilled_work was raised",
                                  "j2": "no record of its completion came out of the broker"}
    assert "  unbilled job not found: j2 (no record of its completion came out of the broker)" in loop_lines(r)
