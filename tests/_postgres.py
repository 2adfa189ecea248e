"""A real PostgreSQL server on loopback for the tests, from the ``pgserver`` wheel's binaries.

PostgreSQL refuses to run as root, and CI runs as root: then ``initdb`` and
``postgres`` run as the unprivileged user ``nobody`` (``user=``/``group=`` of
:mod:`subprocess`), on a data directory that user owns. That directory cannot be
under pytest's tmp dir (``/tmp/pytest-of-root`` is root's, mode 0700, and nobody
may not pass through it), so it is a fresh directory of its own in the system
temp dir, removed when the server stops. Not root: the server runs as the
current user, under the directory it is given.

The server listens on 127.0.0.1 only, on a free port picked at start (no unix
socket), and asks for a password (scram-sha-256) even there, so a test proves
that a client gets it by reference (``PGPASSWORD``, a Dagster ``{env: ...}``)
and never in a URL. Nothing is written under the home directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PostgresServer", "postgres_bin", "start_postgres"]

_UNPRIVILEGED = "nobody"
_READY_TIMEOUT_S = 60


def postgres_bin() -> Path | None:
    """The directory of ``initdb`` and ``postgres``: the ``pgserver`` wheel's, else Debian's newest; ``None`` if neither."""
    spec = importlib.util.find_spec("pgserver")  # not imported: its import touches user dirs
    if spec and spec.submodule_search_locations:
        wheel = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (wheel / "postgres").is_file():
            return wheel
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    return debian[-1].parent if debian else None


@dataclass
class PostgresServer:
    """A running server: connect to ``host:port`` as ``user`` with ``password`` (superuser)."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    process: subprocess.Popen = field(repr=False)
    data_dir: Path = field(repr=False)
    log: Path = field(repr=False)

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg2") -> str:
        """A SQLAlchemy URL without the password (libpq reads it from ``PGPASSWORD``)."""
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=database)

    def create_database(self, name: str) -> str:
        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name

    def stop(self) -> None:
        """Fast shutdown of the server this module started (by its pid), then remove its data."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown: roll back, disconnect, stop
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> dict:
    """``subprocess`` keyword arguments that drop root to an unprivileged user; nothing when not root."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(_UNPRIVILEGED)
    except KeyError:
        raise RuntimeError(
            f"PostgreSQL will not run as root and there is no user {_UNPRIVILEGED!r} to run it as; "
            "create one (useradd --system nobody) or run the tests as a non-root user"
        ) from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "umask": 0o077}


def start_postgres(log_dir: Path, user: str = "aiplane") -> PostgresServer:
    """Initialize a cluster and start a server on a free loopback port; the caller calls :meth:`PostgresServer.stop`."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("No PostgreSQL server found: pip install pgserver (the test extra), or apt-get install postgresql")
    drop = _run_as()
    data_root = Path(tempfile.mkdtemp(prefix="aiplane-pg-"))
    if drop:
        os.chown(data_root, drop["user"], drop["group"])
    data = data_root / "data"
    password = secrets.token_urlsafe(16)
    pwfile = data_root / "pwfile"
    pwfile.write_text(password + "\n")
    if drop:
        os.chown(pwfile, drop["user"], drop["group"])
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "TZ": "UTC"}
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "postgres.log"
    try:
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}", "--auth=scram-sha-256",
             "--encoding=UTF8", "--no-locale", "--no-sync"],
            check=True, capture_output=True, text=True, env=env, cwd=data_root, **drop,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(data_root, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({exc.returncode}): {exc.stderr or exc.stdout}") from None
    pwfile.unlink()
    last = ""
    for _attempt in range(3):  # the free port may be taken between the probe and the bind
        port = _free_port()
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                 "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "max_connections=100",
                 "-c", "shared_buffers=32MB"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=data_root, start_new_session=True, **drop,
            )  # fmt: skip
        server = PostgresServer("127.0.0.1", port, user, password, process, data_root, log)
        if _wait_ready(server):
            return server
        last = log.read_text(errors="replace")[-2000:]
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(timeout=10)
    shutil.rmtree(data_root, ignore_errors=True)
    raise RuntimeError(f"PostgreSQL did not start; its log ends:\n{last}")


def _wait_ready(server: PostgresServer) -> bool:
    import psycopg2

    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        with contextlib.suppress(psycopg2.OperationalError):
            server.connect().close()
            return True
        time.sleep(0.1)
    return False
