"""A throwaway PostgreSQL server for the tests and the benchmark: Debian's binaries
(``SEEDANCE_TEST_PG_BINDIR``, default the newest /usr/lib/postgresql/N/bin), a temporary directory,
a free loopback port; run as the ``postgres`` user when started by root. Never a server
the system started."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


def _bindir() -> Path:
    """``SEEDANCE_TEST_PG_BINDIR``, else the newest Debian ``postgresql-N`` installed."""
    if os.environ.get("SEEDANCE_TEST_PG_BINDIR"):
        return Path(os.environ["SEEDANCE_TEST_PG_BINDIR"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
                   if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BINDIR = _bindir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """A throwaway PostgreSQL server in a temporary directory, on a loopback port and a
    Unix socket there (run as the ``postgres`` user when the tests run as root)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sb-pg-"))
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
            if not stat.S_ISCHR(os.stat("/dev/null").st_mode):
                # A sandbox whose /dev/null is a plain root-owned file: initdb writes to it.
                # Give the server's processes a private one (a mount namespace of their own).
                null = self.dir / "null"
                os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                os.chmod(null, 0o666)
                self.as_user = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /dev/null && exec "$@"', str(null),
                                *self.as_user]
        self.data = self.dir / "data"
        subprocess.run([*self.as_user, str(PG_BINDIR / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                        "postgres", "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*self.as_user, str(PG_BINDIR / "postgres"), "-D", str(self.data), "-k", str(self.dir), "-p",
             str(self.port), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=80", "-c",
             "shared_buffers=16MB"], stdout=subprocess.DEVNULL, stderr=open(self.dir / "server.log", "ab"),  # noqa: SIM115
            start_new_session=True)
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(self.base_url(), connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    log = (self.dir / "server.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"the test PostgreSQL server did not start: {log}") from None
                time.sleep(0.1)

    def base_url(self, port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/postgres"

    def url(self, ledger: str | None = None, port: int | None = None) -> str:
        return f"{self.base_url(port)}?ledger={ledger or 't' + uuid.uuid4().hex[:12]}"

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (the whole server dies at once)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the postmaster and every backend
        self.proc.wait(timeout=30)
        # The killed postmaster may linger as a zombie nobody reaps (a container's init),
        # which a restart would take for a running server: once it is dead or a zombie, its
        # lock file is stale.
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().split()[0])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    break
                if state == "Z":
                    break
                time.sleep(0.05)
            pid_file.unlink()
        (self.dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
