"""One writer per aiplane home at a time.

Two ``aiplane up`` on one home would both see the same assets stale, both train,
and both publish and serve; a Dagster run launched from the UI while ``up`` runs
would do the same. Every process that materializes holds the home's lock for as
long as it does: a second one waits, saying which process holds the home, and
then finds the work done (its staleness is decided only once it holds the lock).

The lock is an ``flock`` on ``<home>/.lock``: the kernel releases it when its
holder dies, ``kill -9`` included, so a crash never leaves the home locked. The
file also names its holder (pid, command, start), written once the lock is
held, for the message a waiter prints. ``flock`` is per open file, not per
process, so the holding is counted here per process: a Dagster run executed in
the process that holds the lock (``aiplane up`` runs its runs in process) goes
on, where a second ``flock`` would wait for itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import AiplaneError
from .processes import process_gone, process_token

__all__ = ["hold_home", "holder_of", "HomeBusy"]

LOCK_FILE = ".lock"


class HomeBusy(AiplaneError):
    """The home is held by another process and the caller would not wait."""


# This process's holdings: resolved home -> (open lock file, depth). Process state by nature, like the flock itself.
_held: dict[Path, list[Any]] = {}
_guard = threading.Lock()


def holder_of(home: str | os.PathLike[str]) -> str | None:
    """Who holds ``home`` as the holder wrote it (``pid 123 (aiplane up), since 2026-12-04 19:30:01``), or ``None``."""
    try:
        info = json.loads((Path(home) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or process_gone(pid, str(info.get("start", ""))):
        return None  # the holder wrote it and has since ended (or nothing was written yet)
    return f"pid {pid} ({info.get('command', '?')}), since {info.get('since', '?')}"


_POLL_S = 0.2


def _wait_for_lock(f: Any) -> None:
    """Take ``f``'s flock once it is free, polling: a blocking ``flock`` that a Ctrl-C reaches just before the call
    blocks (after Python last checked for signals) would wait for the holder, not give up at once."""
    import fcntl

    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(_POLL_S)  # interruptible: the KeyboardInterrupt comes at the latest when it returns


@contextlib.contextmanager
def hold_home(
    home: str | os.PathLike[str], command: str, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold ``home``'s lock for the block; re-entrant within this process.

    If another process holds it: with ``wait``, ``on_wait`` is called once with a
    sentence naming the holder and the call blocks until the lock is free (Ctrl-C
    interrupts the wait); without, :class:`HomeBusy` is raised with that sentence.
    """
    import fcntl

    home = Path(home).expanduser().resolve()
    with _guard:
        if home in _held:
            _held[home][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            _release(home)
        return
    try:
        home.mkdir(parents=True, exist_ok=True)
        f = open(home / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole block, closed by _release
    except OSError as exc:
        raise AiplaneError(
            f"Cannot use {home} as the aiplane home ({exc.strerror or exc}): set AIPLANE_HOME (or the deployment's "
            "`home:`) to a directory this user can create and write."
        ) from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = holder_of(home) or "another process"
            busy = f"{home} is in use by {who}: one aiplane run per home at a time"
            if not wait:
                raise HomeBusy(f"{busy}. Wait for it to finish, or use another home (AIPLANE_HOME).") from None
            if on_wait is not None:
                on_wait(f"{busy}; waiting for it to finish (Ctrl-C to give up).")
            _wait_for_lock(f)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({
            "pid": os.getpid(),
            "start": process_token(),
            "command": command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }))  # fmt: skip
        f.flush()
    except BaseException:  # interrupted too: closing the file releases the flock, if it was taken; re-raised
        f.close()
        raise
    with _guard:
        _held[home] = [f, 1]
    try:
        yield
    finally:
        _release(home)


def _release(home: Path) -> None:
    with _guard:
        entry = _held[home]
        entry[1] -= 1
        if entry[1]:
            return
        del _held[home]
    f = entry[0]
    # The holder's record is cleared before the lock is let go, so a waiter never names a finished holder.
    with contextlib.suppress(OSError):
        f.seek(0)
        f.truncate()
        f.flush()
    f.close()
