"""The ``concord`` command: run a worker, run the demo, query status, and the tools other modules add."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Callable, Sequence

from concord.exceptions import ConcordError

# Modules that add subcommands: each has ``register(subparsers)``; a subcommand's parser sets
# ``func`` to a callable taking the parsed args and returning an exit status.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "concord.runtime.worker",
    "concord.tools.demo",
    "concord.tools.bench",
    "concord.tools.chaos",
    "concord.owners.cli",
    "connectors.inbound.ingest",
    "connectors.inbound.webhooks",
    "connectors.outbound.cli",
    "connectors.fetch.cli",
    "concord.tools.audit",
    "concord.tools.rules_diff",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="concord",
        description="Concord keeps CRM, dispatch and billing in agreement: change events in, "
        "idempotent commands and owned exceptions out.",
        epilog="Broker: KAFKA_BOOTSTRAP_SERVERS if set, else an embedded broker Concord starts and stops.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``concord`` command; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so every broker and worker a command started is stopped on the way out
    # (`concord run` replaces this with faust's own handlers).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("concord: interrupted", file=sys.stderr)
        return 130
    except ConcordError as exc:
        print(f"concord {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
