"""A throwaway PostgreSQL cluster from Debian's server binaries, on a free loopback port (the stack's databases)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from concord.exceptions import ConcordError
from concord.runtime.broker import free_port


class PostgresError(ConcordError):
    """PostgreSQL could not be found or started."""


def pg_binary(name: str) -> str:
    """A PostgreSQL server binary, from PATH or Debian's /usr/lib/postgresql/<major>/bin (newest first)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if not found:
        raise PostgresError(f"PostgreSQL server binary {name} is neither on PATH nor in /usr/lib/postgresql/*/bin: "
                            "run `make system-packages` (installs Debian's postgresql)")
    return found


def _run_as() -> tuple[list[str], pwd.struct_passwd | None]:
    # initdb refuses root: as root the cluster belongs to the postgres user (else nobody)
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"], pw
    raise PostgresError("running as root and neither a postgres nor a nobody user exists to run initdb as")


@dataclass
class PgCluster:
    """A running cluster: user ``concord`` with trust authentication on 127.0.0.1 only."""

    port: int
    root: Path
    _as: list[str] = field(default_factory=list, repr=False)
    _owned: bool = True

    host: str = "127.0.0.1"
    user: str = "concord"

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string to ``dbname``."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.root / "server.log"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL through psql (no Python driver needed); fail with its message."""
        done = subprocess.run([pg_binary("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", self.dsn(dbname),
                               "-c", sql], capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise PostgresError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def stop(self) -> None:
        """Stop the server at once (a test cluster keeps nothing) and remove its files if it made them."""
        subprocess.run([*self._as, pg_binary("pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w",
                        "stop"], capture_output=True, timeout=60, cwd=self.root)
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(root: Path | None = None, *, logical: bool = False, port: int | None = None,
                   timeout: float = 60) -> PgCluster:
    """Create the cluster (unless ``root`` holds one) and start it; ``logical``: wal_level=logical for Debezium."""
    initdb, pg_ctl = pg_binary("initdb"), pg_binary("pg_ctl")
    owned = root is None
    root = Path(tempfile.mkdtemp(prefix="concord-pg-")) if root is None else Path(root)
    root.mkdir(parents=True, exist_ok=True)
    as_user, pw = _run_as()
    if pw is not None:
        closed = [str(d) for d in root.resolve().parents if not os.stat(d).st_mode & 0o001]
        if closed:  # the server runs as another user, who must reach its data directory
            raise PostgresError(f"{root}: the {pw.pw_name} user running PostgreSQL cannot enter {closed[0]} "
                                "(mode o-x): choose a directory under one others can traverse")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    port = port or free_port()
    log = root / "server.log"

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=timeout, cwd=root)
        if done.returncode:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PostgresError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr or done.stdout}\n{tail}")

    data = root / "data"
    if not (data / "PG_VERSION").exists():
        run(initdb, "-D", str(data), "-U", "concord", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
    opts = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=50")
    if logical:  # logical decoding (pgoutput) for a CDC connector: one slot and one WAL sender are enough here
        opts += " -c wal_level=logical -c max_replication_slots=4 -c max_wal_senders=4"
    run(pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", str(int(timeout)), "start", "-o", opts)
    cluster = PgCluster(port, root, as_user, owned)
    deadline = time.monotonic() + timeout
    while True:  # pg_ctl -w waits for the socket; a first connection over TCP proves the listener too
        try:
            cluster.psql("SELECT 1")
            return cluster
        except PostgresError:
            if time.monotonic() > deadline:
                cluster.stop()
                raise
            time.sleep(0.2)
