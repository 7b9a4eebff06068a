"""`concord demo --serve`: after the report the inbox stays up with a credential per team, until Ctrl-C."""

import http.cookiejar
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest

from concord.contracts.topics import OWNERS

pytestmark = pytest.mark.broker


def test_demo_serve_prints_the_inbox_and_credentials_and_stops_on_ctrl_c(broker, tmp_path):
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers)
    proc = subprocess.Popen([sys.executable, "-m", "concord", "demo", "--serve", "--customers", "6", "--days", "3",
                             "--resolve", "0", "--state-dir", str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    said = []
    try:
        deadline = time.monotonic() + 240
        while not any("press Ctrl-C" in s for s in said):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(said)
            try:
                said.append(lines.get(timeout=1))
            except queue.Empty:
                continue
        text = "".join(said)
        url = re.search(r"the owners' inbox is at (http://127\.0\.0\.1:\d+/inbox)", text).group(1)
        tokens = dict(re.findall(r"demo:\s+([a-z-]+)\s+(\S{20,})\n", text))
        assert sorted(tokens) == sorted(OWNERS), text
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and 'id=token' in resp.read().decode(), "the sign-in form"
        form = urllib.parse.urlencode({"token": tokens["finance"], "user": "demo"}).encode()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with browser.open(urllib.request.Request(url + "/login", data=form, method="POST"), timeout=10) as resp:
            assert "Inbox: finance" in resp.read().decode(), "signed in, redirected, the cookie kept"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
        assert "unaccounted: 0" in proc.stdout.read(), "the report, on stdout"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)
