"""Finding and stopping our detached servers, and the per-endpoint state directory they are recorded in.

An endpoint's state lives in ``{home}/serving/{endpoint}/``: ``current.json``
names the live server (pid, url, port, digests, log) and ``.lock`` serializes
deploys and stops of that endpoint across processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiplane.core.errors import ConfigError

__all__ = [
    "SERVER_MODULE",
    "CURRENT",
    "check_endpoint_name",
    "read_current",
    "live_current",
    "locked",
    "is_our_server",
    "strays",
    "kill_now",
    "terminate",
    "remove_quietly",
]

SERVER_MODULE = "aiplane.plugins.kserve.server"
CURRENT = "current.json"
STOP_GRACE_S = 15.0
"""SIGTERM, then this long for a graceful exit, then SIGKILL."""
_ENDPOINT_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?")


def check_endpoint_name(name: str) -> str:
    """``name`` if it is usable as a directory name and a URL path segment; ConfigError otherwise."""
    if not isinstance(name, str) or not _ENDPOINT_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"Endpoint name {name!r} is not usable: use 1-64 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit (e.g. 'tickets')."
        )
    return name


def read_current(state_dir: Path) -> dict[str, Any] | None:
    """What ``current.json`` says, or ``None`` when there is none (or it is unreadable)."""
    try:
        data = json.loads((state_dir / CURRENT).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def live_current(state_dir: Path, model_name: str) -> dict[str, Any] | None:
    """``current.json`` when the server it names is running, else ``None``."""
    current = read_current(state_dir)
    return current if current is not None and is_our_server(current["pid"], model_name) else None


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Hold the endpoint's lock: one deploy or stop of an endpoint at a time."""
    import fcntl

    state_dir.mkdir(parents=True, exist_ok=True)
    # Opened without inheritance (Python's default), so a server we start never holds it.
    with open(state_dir / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_our_server(pid: int, model_name: str | None = None) -> bool:
    """True if ``pid`` is a running server of this plugin (serving ``model_name`` when given).

    Guards every signal we send: a recorded pid may since have been reused by an
    unrelated process.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    if SERVER_MODULE not in cmdline:
        return False
    if model_name is None:
        return True
    return any(a == "--model-name" and b == model_name for a, b in zip(cmdline, cmdline[1:]))


def strays(state_dir: Path, model_name: str, keep: int | None) -> list[int]:
    """Our servers of this endpoint other than ``keep``: left running by a deploy that was killed mid-way.

    A server runs in its endpoint's state directory, which tells endpoints of the
    same name under different homes apart.
    """
    import psutil

    state = state_dir.resolve()
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        if proc.pid == keep or not proc.info["cwd"] or Path(proc.info["cwd"]) != state:
            continue
        if is_our_server(proc.pid, model_name):
            found.append(proc.pid)
    return found


def _gone(pid: int) -> bool:
    import psutil

    with contextlib.suppress(ChildProcessError):
        # Reap it if it is our child, or it lingers as a zombie.
        os.waitpid(pid, os.WNOHANG)
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # Our servers lead their own session and process group (start_new_session),
        # so the group reaches anything they started too.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def kill_now(pid: int) -> None:
    """SIGKILL a server we just started and wait until it is gone."""
    _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def terminate(pid: int, model_name: str | None = None, grace_s: float = STOP_GRACE_S) -> bool:
    """Stop our server ``pid`` (SIGTERM, SIGKILL after ``grace_s``); False if it was not running.

    Does nothing to a process that is not our server.
    """
    if not is_our_server(pid, model_name):
        return False
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while not _gone(pid):
        if time.monotonic() >= deadline:
            kill_now(pid)
            break
        time.sleep(0.05)
    return True


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
