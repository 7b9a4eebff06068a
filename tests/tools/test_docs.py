"""The README says what the code does: its metrics table, and every command's --help."""

import re
import subprocess
import sys
from pathlib import Path

import connectors.outbound.metrics  # noqa: F401 - registers the adapters' metrics on the shared registry
from concord.runtime.metrics import REGISTRY
from concord.tools.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_metrics_table_lists_exactly_what_the_code_exports():
    text = README.read_text()
    table = text[text.index("## Metrics"):]
    documented = set(re.findall(r"^\| `(concord_[a-z_]+)`", table, flags=re.M))
    exported = {m.name + ("_total" if m.type == "counter" else "") for m in REGISTRY.collect()}
    assert documented == exported, (f"exported but not in the README: {sorted(exported - documented)}; "
                                    f"in the README but not exported: {sorted(documented - exported)}")


def test_readme_starts_with_exactly_the_two_setup_commands():
    first_block = README.read_text().split("```")[1]
    assert [ln.split("#")[0].strip() for ln in first_block.splitlines()[1:] if ln.strip()] == ["make demo",
                                                                                              "make test"]


def test_every_subcommand_explains_itself():
    parser = build_parser()
    names = sorted(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse keeps them here
    assert {"run", "status", "demo", "bench", "exceptions", "trace", "ingest", "webhooks", "adapters"} <= set(names)
    for name in names:
        out = subprocess.run([sys.executable, "-m", "concord", name, "--help"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and "usage: concord" in out.stdout, (name, out.stderr)
    bad = subprocess.run([sys.executable, "-m", "concord", "no-such-command"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
