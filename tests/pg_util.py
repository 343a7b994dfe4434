"""A throw-away PostgreSQL cluster for tests: initdb + pg_ctl in a temp dir, on a free loopback port.

Run as the ``postgres`` user when the tests run as root (initdb refuses root). Tests that need
it skip with the reason when the server binaries are missing, and fail instead under
NUCLIDE_REQUIRE_POSTGRES=1 (CI installs the Debian package ``postgresql``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.stack import free_port

REQUIRE_ENV = "NUCLIDE_REQUIRE_POSTGRES"


def find_bin_dir() -> Path | None:
    """The newest PostgreSQL server's bin directory (Debian: /usr/lib/postgresql/<major>/bin), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def missing_reason() -> str | None:
    """Why no cluster can be started here, or None."""
    if find_bin_dir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no 'postgres' user to run the server as (apt-get install postgresql)"
    return None


class PgCluster:
    """One server for a test session; ``new_database()`` gives each test (or module) an empty database."""

    def __init__(self, fsync: bool = False) -> None:
        bin_dir = find_bin_dir()
        self.fsync = fsync
        assert bin_dir is not None
        self.bin_dir = bin_dir
        self.port = free_port()
        # not under pytest's tmp dirs: those are private to root, and the server runs as 'postgres'
        # below /var/tmp, not $TMPDIR: a test's own temporary directory is root's alone (0700), and the
        # cluster runs as the postgres user, which must reach its data directory
        self.root = Path(tempfile.mkdtemp(prefix="nuclide-pg-", dir="/var/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user = None if os.geteuid() else "postgres"
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(self.root, info.pw_uid, info.pw_gid)
        self.url_base = f"postgresql://postgres@127.0.0.1:{self.port}"
        self._count = 0

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
                               f"\n{self.server_log()[-2000:]}")
        return proc

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> "PgCluster":
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8",
                  "--locale=C")  # byte order, like SQLite's: id ranges and ORDER BY agree on both
        self._pg_ctl_start()
        return self

    def _pg_ctl_start(self) -> None:
        # loopback only, the socket in our temp dir; fsync off for tests (they kill processes, never the machine),
        # on for benchmarks (a call is durable on disk when acknowledged, as on SQLite)
        durability = "" if self.fsync else " -c fsync=off -c full_page_writes=off"
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c max_connections=200{durability}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def restart(self) -> None:
        """pg_ctl restart -m fast: every client connection is cut, the server is back once this returns."""
        # -l again: without it the new server would write to (and hold open) our capture pipes
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w", "-t", "60", "restart")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def pids(self) -> list[int]:
        """The server's processes now: the postmaster and its children (one backend per connection, the writers)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        kids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and _ppid(int(entry)) == postmaster]
        return [postmaster, *kids]

    def new_database(self, prefix: str = "t") -> str:
        """An empty database of its own; returns its URL."""
        import psycopg

        self._count += 1
        name = f"{prefix}_{self._count}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(f"{self.url_base}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{self.url_base}/{name}"


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
