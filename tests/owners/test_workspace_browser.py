"""The owners' workspace in headless Chromium against a running worker on the session's broker."""

import json
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from kafka_helpers import CODEC, committed, end_offsets, produce, read_until, start_deployment_at_end

from concord.contracts import events as ev
from concord.contracts import topics
from concord.runtime.broker import free_port
from concord.tools.demo import worker_process

pytestmark = pytest.mark.broker
NOW = int(time.time() * 1000)
LINES = [ev.line("SVC-INSTALL", 2, 25_000)]
TOKENS = {team: f"ws-token-{team}-{i}" * 2 for i, team in enumerate(topics.OWNERS)}
APP_ID = f"concord-ws-{uuid.uuid4().hex[:8]}"  # the module's worker
NAMES = topics.Deployment(APP_ID)
WATCH = [*(t.name for t in topics.COMMANDS), *NAMES.exception_queues]
REVENUE_OPS = NAMES.exceptions("revenue-ops")
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1400,1000")


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory):
    """One worker process for the module, with its own consumer group, state and owner credentials."""
    port = free_port()
    app_id = APP_ID
    state = tmp_path_factory.mktemp("worker")
    env = {"CONCORD_DATA_DIR": str(state), "CONCORD_GAP_WAIT_S": "1",
           "CONCORD_OWNER_TOKENS": ",".join(f"{team}={token}" for team, token in TOKENS.items())}
    start_deployment_at_end(broker.bootstrap_servers, app_id)  # its own topics, not earlier tests' traffic
    with worker_process(broker.bootstrap_servers, port, app_id, state / "worker.log", env) as proc:
        yield {"port": port, "url": f"http://127.0.0.1:{port}", "proc": proc}


@pytest.fixture
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in CHROMIUM_ARGS:
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    d.implicitly_wait(0)
    try:
        yield d
    finally:
        d.quit()


def publish(bs, *evs):
    produce(bs, [(topics.changes_topic(e["source_system"], e["entity_type"]), e["entity_id"].encode(),
                  CODEC.encode("change_event", e)) for e in evs])


def customer_without_account(cid):
    return ev.change_event("customer", cid, 1, ev.customer(f"Co {cid}", account=None,
                                                           external_ids={"stripe": f"cus_{cid}"}), cid, at=NOW)


def status_of(worker, cid):
    try:
        with urllib.request.urlopen(f"{worker['url']}/customers/{cid}", timeout=10) as resp:
            return json.load(resp)
    except OSError:
        return None


def eventually(check, what, timeout=60):
    """Poll ``check`` until it returns something true; fail naming ``what`` (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"never: {what() if callable(what) else what}"
        time.sleep(0.3)


def tracker_at(bs, what):
    """``what`` not seen, with where the worker's exception tracker stands on the revenue-ops queue, for a failure."""
    ends = end_offsets(bs, [REVENUE_OPS])
    done = committed(bs, APP_ID, [REVENUE_OPS])
    behind = {p: ends[(t, p)] - max(o, 0) for (t, p), o in done.items() if ends[(t, p)] > max(o, 0)}
    return f"{what}; the worker's group is behind on {REVENUE_OPS} by {behind or 'nothing'} (partition: records)"


def text_of(driver, element_id):
    """The text of the element with this id, or "" while the page (a form's answer, say) is not there yet."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, element_id)
    return found[0].text if found else ""


def page_shows(driver, wanted):
    """What the browser shows instead of ``wanted``, for a failure's message."""
    from selenium.webdriver.common.by import By

    return f"{wanted}; the browser shows {driver.current_url}: {driver.find_element(By.TAG_NAME, 'body').text[:1500]}"


def tab_reaches(driver, wanted, limit=80):
    """Press Tab from the top of the page until every element id in ``wanted`` had the focus once."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
    seen = set()
    for _ in range(limit):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        seen.add(driver.execute_script("return document.activeElement.id || document.activeElement.className"))
        if wanted <= seen:
            return seen
    raise AssertionError(f"not reachable with Tab: {sorted(wanted - seen)} (reached {sorted(seen)})")


def test_sign_in_filter_open_an_item_assign_bulk_replay_and_reconcile(broker, worker, driver, uid, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    bs = broker.bootstrap_servers
    bulk = [f"bk{uid}-{i}" for i in range(3)]
    pic = f"pic{uid}"
    since = end_offsets(bs, WATCH)
    publish(bs, *(customer_without_account(c) for c in [*bulk, pic]))
    read_until(bs, since, lambda got: {g.record.get("customer_id") for g in got
                                       if g.topic == "commands.dispatch"} >= {*bulk, pic}, timeout=90)
    publish(bs, *(ev.change_event("deal", f"{c}-deal", 1, ev.deal("closed_won", LINES), c, at=NOW)
                  for c in [*bulk, pic]))
    publish(bs, ev.change_event("job", f"{pic}-job", 1, ev.job("completed", LINES, deal_id=f"{pic}-deal"), pic, at=NOW),
            ev.change_event("invoice", f"{pic}-inv", 1, ev.invoice("open", LINES, job_id=f"{pic}-job"), pic, at=NOW),
            ev.change_event("payment", f"{pic}-pay", 1, ev.payment("failed", f"{pic}-inv", 50_000), pic, at=NOW))
    got = read_until(bs, since, lambda got: {g.record["entity_id"] for g in got
                                             if g.topic == REVENUE_OPS
                                             and g.record["reason_code"] == "missing_billing_account"}
                     >= {f"{c}-deal" for c in [*bulk, pic]}, timeout=90)
    eids = {g.record["customer_id"]: g.record["exception_id"] for g in got if g.topic == REVENUE_OPS
            and g.record["entity_id"] == f"{g.record['customer_id']}-deal"}
    eventually(lambda: (status_of(worker, pic) or {}).get("payments"), "the payment reached the status table")

    # sign in, from the keyboard
    driver.get(worker["url"] + "/inbox")
    assert "x-" + eids[pic] not in driver.page_source, "the queue is not shown before signing in"
    driver.find_element(By.ID, "token").send_keys(TOKENS["revenue-ops"])
    driver.find_element(By.ID, "user").send_keys("alice", Keys.ENTER)
    eventually(lambda: driver.find_elements(By.ID, "filters"), "the inbox after signing in")
    assert "signed in as revenue-ops" in driver.find_element(By.TAG_NAME, "nav").text
    nav_colour = driver.execute_script("return getComputedStyle(document.querySelector('nav')).backgroundColor")
    assert nav_colour == "rgb(31, 45, 61)", "the vendored stylesheet is served and allowed by the page's policy"
    tab_reaches(driver, {"q", "f-reason", "f-customer", "apply", "tab-escalated", "open"})

    # filter: one reason, one set of customers
    Select(driver.find_element(By.ID, "f-reason")).select_by_value("missing_billing_account")
    driver.find_element(By.ID, "f-customer").send_keys(f"bk{uid}", Keys.ENTER)
    eventually(lambda: "3 matching" in text_of(driver, "count"), lambda: page_shows(driver, "3 matching, filtered"))
    rows = driver.find_elements(By.CSS_SELECTOR, "#queue tbody tr")
    assert sorted(r.get_attribute("id") for r in rows) == sorted(f"x-{eids[c]}" for c in bulk)
    assert all(r.get_attribute("data-reason") == "missing_billing_account" for r in rows)
    assert all("500.00 USD" in r.text for r in rows), "the deal's amount is the money at risk"
    driver.save_screenshot(str(tmp_path / "inbox.png"))
    filtered = driver.current_url

    # open an item: the customer across systems, links, runbook, history
    driver.get(f"{worker['url']}/inbox?customer={pic}")
    driver.find_element(By.CSS_SELECTOR, f"#x-{eids[pic]} a.open").click()
    steps = [(r.get_attribute("data-kind"), r.find_elements(By.TAG_NAME, "td")[2].text,
              r.find_elements(By.TAG_NAME, "td")[3].text)
             for r in driver.find_elements(By.CSS_SELECTOR, "#picture tbody tr")]
    assert steps == [("deal", "invoiced", "500.00 USD"), ("job", "invoiced", "500.00"),
                     ("invoice", "open", "500.00 USD"), ("payment", "failed", "500.00 USD")]
    assert driver.find_element(By.ID, "at-risk").text == "500.00 USD"
    assert f"cus_{pic}" in driver.find_element(By.ID, "actions").text, "the suggestion is offered"
    assert f"/Opportunity/{pic}-deal/view" in driver.find_element(By.ID, "picture").get_attribute("innerHTML")
    assert "What it means" in driver.find_element(By.ID, "runbook").text
    assert "changes.crm.deal" in driver.page_source and f'"{pic}-deal"' in driver.find_element(By.ID, "original").text
    tab_reaches(driver, {"resolve", "ack", "assign", "discard"})
    driver.save_screenshot(str(tmp_path / "item.png"))
    driver.find_element(By.ID, "assignee-input").send_keys("bob", Keys.ENTER)
    eventually(lambda: "assigned to bob" in text_of(driver, "msg"), lambda: page_shows(driver, "assigned to bob"))

    def assigned():
        driver.refresh()
        return driver.find_element(By.ID, "assignee").text == "bob" and "assigned" in driver.find_element(
            By.ID, "history").text
    eventually(assigned, "the assignment shown on the item and in its history")
    assert "by revenue-ops:alice" in driver.find_element(By.ID, "history").text

    # bulk replay of the filtered set: a dry-run count first, then the confirmation
    since = end_offsets(bs, WATCH)
    driver.get(filtered)
    driver.find_element(By.ID, "bulk-open").send_keys(Keys.ENTER)  # <details> opens from the keyboard
    assert driver.find_element(By.ID, "op-replay").is_selected()
    driver.find_element(By.ID, "bulk-dry-run").click()
    assert eventually(lambda: driver.find_elements(By.ID, "dry-run-count"),
                      lambda: page_shows(driver, "the dry run"))[0].text == "3"
    driver.save_screenshot(str(tmp_path / "bulk-dry-run.png"))
    driver.find_element(By.ID, "bulk-confirm").click()  # the page comes once the three actions are published
    assert eventually(lambda: driver.find_elements(By.ID, "bulk-accepted"),
                      lambda: page_shows(driver, "the bulk result"))[0].text == "3"
    assert driver.find_element(By.ID, "bulk-refused").text == "0"
    deals = {f"{c}-deal" for c in bulk}
    got = read_until(bs, since, lambda got: {g.record["entity_id"] for g in got if g.topic == "commands.billing"
                                             and g.record["type"] == "create_invoice"} >= deals
                     and {g.key for g in got if g.topic in NAMES.exception_queues
                          and g.record["state"] == "resolved"} >= {eids[c].encode() for c in bulk}, timeout=90)
    invoices = {g.record["entity_id"]: json.loads(g.record["payload"]) for g in got
                if g.topic == "commands.billing" and g.record["type"] == "create_invoice"}
    assert {d: invoices[d]["billing_account_id"] for d in deals} == {f"{c}-deal": f"cus_{c}" for c in bulk}
    assert {g.record["resolution"]["by"] for g in got if g.topic in NAMES.exception_queues
            and g.record["state"] == "resolved" and g.key in {eids[c].encode() for c in bulk}} == {"revenue-ops:alice"}

    # the reconciliation view: tiles and its plots, inline SVG
    driver.get(worker["url"] + "/inbox/reconciliation")
    plots = {p.get_attribute("id") for p in driver.find_elements(By.CSS_SELECTOR, "svg.plot")}
    assert plots == {"plot-reason", "plot-owner", "plot-age", "plot-trend", "plot-customers"}
    assert len(driver.find_elements(By.CSS_SELECTOR, "#tiles .tile")) == 5
    assert driver.find_elements(By.CSS_SELECTOR, "#plot-reason rect.bar"), "a bar for the open exceptions' reasons"
    assert pic in driver.find_element(By.ID, "t-customer").text
    driver.save_screenshot(str(tmp_path / "reconciliation.png"))
    driver.get(worker["url"] + "/inbox/checklist")
    assert driver.find_element(By.ID, "verdict").text in ("All clear.", "Needs attention.")
    driver.save_screenshot(str(tmp_path / "checklist.png"))
    for name in ("inbox", "item", "bulk-dry-run", "reconciliation", "checklist"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name


def test_checklist_command_text_json_and_exit_status(worker):
    base = [sys.executable, "-m", "concord", "checklist", "--url", worker["url"], "--token", TOKENS["finance"]]
    as_json = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=90)
    data = json.loads(as_json.stdout)
    assert as_json.returncode == (1 if data["needs_attention"] else 0), as_json.stderr
    names = [s["name"] for s in data["sections"]]
    assert names == ["Flows and their owners", "Exceptions past SLA, per owner", "Canary",
                     "Dead letters since last week, by reason", "Rule-change checks",
                     "Runbooks referenced by this week's resolutions"]
    flows = data["sections"][0]["data"]
    assert flows["invoice → payment"]["owners"] == ["finance"]
    text = subprocess.run(base, capture_output=True, text=True, timeout=90)
    assert text.returncode == as_json.returncode and "[ok] Flows and their owners" in text.stdout
    wrong = subprocess.run([*base[:-1], "not-a-credential-at-all"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 1 and "401" in wrong.stderr and wrong.stdout == ""


def signed_in(worker, team):
    """A cookie-keeping HTTP client signed in to the workspace as ``team``."""
    import http.cookiejar
    import urllib.parse

    client = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = urllib.parse.urlencode({"token": TOKENS[team], "user": "carol"}).encode()
    client.open(urllib.request.Request(worker["url"] + "/inbox/login", data=form, method="POST"), timeout=10)
    return client


def fetch(client, url, form=None):
    import urllib.error
    import urllib.parse

    data = urllib.parse.urlencode(form, doseq=True).encode() if form is not None else None
    try:
        with client.open(urllib.request.Request(url, data=data, method="POST" if form is not None else "GET"),
                         timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_confirmation_for_a_set_that_moved_does_nothing_and_teams_stay_apart(broker, worker, uid):
    import re

    bs = broker.bootstrap_servers
    cid = f"mv{uid}"
    since = end_offsets(bs, WATCH)
    publish(bs, customer_without_account(cid))
    read_until(bs, since, lambda got: any(g.topic == "commands.dispatch" and g.record["customer_id"] == cid
                                          for g in got), timeout=90)
    deal = f"{cid}-deal"
    publish(bs, ev.change_event("deal", deal, 1, ev.deal("closed_won", LINES), cid, at=NOW))
    got = read_until(bs, since, lambda got: any(g.topic == REVENUE_OPS and g.record["entity_id"] == deal
                                                for g in got), timeout=90)
    eid = next(g.record["exception_id"] for g in got if g.topic == REVENUE_OPS
               and g.record["entity_id"] == deal)
    rev = signed_in(worker, "revenue-ops")
    listed = []

    def shown():
        listed.append(fetch(rev, f"{worker['url']}/inbox?customer={cid}"))
        return f"x-{eid}" in listed[-1][1]
    eventually(shown, lambda: tracker_at(bs, f"the item listed: {listed[-1]}"), timeout=120)

    dry = {"customer": cid, "op": "replay"}
    code, page = fetch(rev, worker["url"] + "/inbox/bulk", dry)
    assert code == 200 and "<b id=dry-run-count>1</b>" in page
    digest = re.search(r'name="digest" value="([0-9a-f]+)"', page).group(1)
    code, page = fetch(rev, worker["url"] + "/inbox/bulk", {**dry, "confirm": "1", "digest": "0" * 16, "expect": "1"})
    assert code == 409 and "nothing was done" in page and digest in page, "the new dry run comes with it"
    code, page = fetch(rev, worker["url"] + "/inbox/bulk", {"customer": cid, "op": "resolve"})
    assert code == 200 and "bulk refused: resolve needs a field=value patch" in page

    other = signed_in(worker, "marketing-ops")  # neither its owner nor its backup (finance)
    assert f"x-{eid}" not in fetch(other, f"{worker['url']}/inbox?customer={cid}")[1], "not their queue"
    code, page = fetch(other, f"{worker['url']}/inbox/item/{eid}?customer={cid}")
    assert code == 403 and "belongs to revenue-ops" in page
    code, page = fetch(rev, f"{worker['url']}/inbox/item/{eid}/act?customer={cid}",
                       {"action": "assign", "assignee": "<script>"})
    assert code == 200 and "refused (400)" in page and "&lt;script&gt;" not in page.split("id=msg")[0]
    code, page = fetch(rev, f"{worker['url']}/inbox/item/{eid}?customer={cid}")
    assert code == 200 and "<dd id=state>open</dd>" in page, "nothing changed"
    anonymous = urllib.request.build_opener()
    code, page = fetch(anonymous, f"{worker['url']}/inbox/reconciliation")
    assert code == 401 and "id=token" in page and cid not in page


def test_the_lists_quick_fix_resolves_with_a_real_click(broker, worker, driver, uid):
    """An item's first suggestion, taken from the list itself; the replay issues the invoice with it."""
    from selenium.webdriver.common.by import By

    bs = broker.bootstrap_servers
    cid, deal = f"qf{uid}", f"qf{uid}-deal"
    since = end_offsets(bs, WATCH)
    publish(bs, customer_without_account(cid))
    read_until(bs, since, lambda got: any(g.topic == "commands.dispatch" and g.record["customer_id"] == cid
                                          for g in got), timeout=90)
    publish(bs, ev.change_event("deal", deal, 1, ev.deal("closed_won", LINES), cid, at=NOW))
    got = read_until(bs, since, lambda got: any(g.topic == REVENUE_OPS and g.record["entity_id"] == deal
                                                for g in got), timeout=90)
    eid = next(g.record["exception_id"] for g in got if g.topic == REVENUE_OPS
               and g.record["entity_id"] == deal)
    driver.get(worker["url"] + "/inbox")
    driver.find_element(By.ID, "token").send_keys(TOKENS["revenue-ops"])
    driver.find_element(By.ID, "login").click()
    # signed in before going on: a navigation right after the click may cancel the sign-in's post, cookie unset
    eventually(lambda: driver.find_elements(By.ID, "filters"), lambda: page_shows(driver, "the inbox after signing in"))

    def listed():  # the tracker takes the record from the queue into its table in its own time
        driver.get(f"{worker['url']}/inbox?customer={cid}")
        return driver.find_elements(By.ID, f"x-{eid}")
    [item] = eventually(listed, lambda: tracker_at(bs, page_shows(driver, "the exception in the inbox")), timeout=120)
    assert "missing_billing_account" in item.text and f"cus_{cid}" in item.text
    item.find_element(By.CSS_SELECTOR, "form.resolve input[name=choose][value='1']").click()
    item.find_element(By.CSS_SELECTOR, "form.resolve button.resolve-btn").click()
    eventually(lambda: "accepted" in text_of(driver, "msg"), lambda: page_shows(driver, "the resolution accepted"))
    got = read_until(bs, since, lambda got: any(g.topic == "commands.billing" and g.record["type"] == "create_invoice"
                                                and g.record["entity_id"] == deal for g in got), timeout=90)
    [inv] = [g.record for g in got if g.topic == "commands.billing" and g.record["type"] == "create_invoice"
             and g.record["entity_id"] == deal]
    assert json.loads(inv["payload"])["billing_account_id"] == f"cus_{cid}"
    assert any(g.topic in NAMES.exception_queues and g.key == eid.encode() and g.record["state"] == "resolved"
               and g.record["resolution"]["by"] == "revenue-ops" for g in got)
