"""Running a workload's process: own process group, lines streamed as they come, nothing left behind.

Every engine that starts a local process (the subprocess engine, ``kfp.local``,
a local Ray driver) has the same needs, so they share this one loop.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from .errors import WorkloadCancelled

__all__ = ["stream_process", "kill_group"]

GRACE_S = 5.0
_DRAIN_S = 1.0


def stream_process(
    cmd: Sequence[str],
    on_line: Callable[[str], None],
    cancel: threading.Event | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    what: str = "workload",
) -> subprocess.Popen:
    """Run ``cmd``, calling ``on_line`` with each line of its output; return the finished process.

    The process gets its own process group (session), so cancelling kills it
    and whatever it started, and nothing else. When ``cancel`` is set the group
    is killed and :class:`WorkloadCancelled` raised; any other exception raised
    while waiting (``on_line`` failing, Dagster's run termination) kills the
    group too and propagates. The run ends when the process exits, even if a
    child it left behind still holds its output open; that child is killed.
    """
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        # A stray non-UTF-8 byte in a library's output must not kill the reader.
        encoding="utf-8",
        errors="replace",
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        _pump(proc, on_line, cancel or threading.Event(), what)
    finally:
        kill_group(proc)
    return proc


def _pump(proc: subprocess.Popen, on_line: Callable[[str], None], cancel: threading.Event, what: str) -> None:
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.put(line)
        finally:
            lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    exited_at: float | None = None
    while True:
        if cancel.is_set():
            raise WorkloadCancelled(f"{what} (pid {proc.pid}) was cancelled")
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > _DRAIN_S:
                    break
            continue
        if line is None:
            break
        on_line(line.rstrip("\n"))
    proc.wait()


def kill_group(proc: subprocess.Popen) -> None:
    """Stop ``proc`` and everything in its process group: SIGTERM (so the worker cleans up), then SIGKILL.

    Waits for the whole group, not only the leader: a task the leader started
    may still be writing when the leader is gone.
    """
    pgid = proc.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or its zombie keeps the group "alive"
            if not _group_alive(pgid):
                break
            time.sleep(0.05)
        if not _group_alive(pgid):
            break
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
