"""Running a workload's process: own process group, lines streamed as they come, nothing left behind.

Every engine that starts a local process (the subprocess engine, ``kfp.local``,
a local Ray driver) has the same needs, so they share this one loop, and the
one way to make a run's working directory (:func:`workload_dir`). Such a
directory records the process that owns it, so one left behind by an owner
that was killed (``kill -9`` of ``aiplane up``) is found and removed by
:func:`sweep_orphaned_workdirs`.

A process that outlives whoever started it (a model server) is started as a
tree aiplane owns (:func:`start_tree`): what is recorded about it is enough to
stop all of it later (:func:`stop_tree`), from another process, after its root
was killed too.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import WorkloadCancelled

if TYPE_CHECKING:
    import psutil

__all__ = [
    "stream_process",
    "start_process",
    "follow_process",
    "kill_group",
    "Standby",
    "discard_standbys",
    "workload_dir",
    "sweep_orphaned_workdirs",
    "process_token",
    "process_gone",
    "start_tree",
    "tree_processes",
    "stop_tree",
    "TREE_ENV",
    "WORKDIR_PREFIX",
    "OWNER_FILE",
]

GRACE_S = 5.0
_DRAIN_S = 1.0


def stream_process(
    cmd: Sequence[str],
    on_line: Callable[[str], None],
    cancel: threading.Event | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    what: str = "workload",
    done: Callable[[], bool] | None = None,
) -> subprocess.Popen[str]:
    """Run ``cmd``, calling ``on_line`` with each line of its output; return the finished process.

    The process gets its own process group (session), so cancelling kills it
    and whatever it started, and nothing else. When ``cancel`` is set the group
    is killed and :class:`WorkloadCancelled` raised; any other exception raised
    while waiting (``on_line`` failing, Dagster's run termination) kills the
    group too and propagates. The run ends when the process exits, even if a
    child it left behind still holds its output open; that child is killed.
    ``done``, asked after each line, ends it sooner: once true, the process has
    said all the caller needs (its result), and its group is killed at once
    rather than waited for or given time to clean up.
    """
    return follow_process(start_process(cmd, env, cwd), on_line, cancel, what, done)


def start_process(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: int = subprocess.DEVNULL,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[str]:
    """Start ``cmd`` as :func:`stream_process` does (own session, stdout and stderr in one text pipe)
    without reading it yet; :func:`follow_process` does that. ``stdin`` may be ``subprocess.PIPE``;
    ``pass_fds`` stay open in the process."""
    return subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=stdin,
        text=True,
        # A stray non-UTF-8 byte in a library's output must not kill the reader.
        encoding="utf-8",
        errors="replace",
        env=dict(env) if env is not None else None,
        cwd=cwd,
        pass_fds=tuple(pass_fds),
        start_new_session=True,
    )


def follow_process(
    proc: subprocess.Popen[str],
    on_line: Callable[[str], None],
    cancel: threading.Event | None = None,
    what: str = "workload",
    done: Callable[[], bool] | None = None,
) -> subprocess.Popen[str]:
    """The second half of :func:`stream_process`, for a process :func:`start_process` started."""
    answered = False
    try:
        answered = _pump(proc, on_line, cancel or threading.Event(), what, done or (lambda: False))
    finally:
        kill_group(proc, grace_s=0.0 if answered else GRACE_S)
    return proc


def _pump(
    proc: subprocess.Popen[str], on_line: Callable[[str], None], cancel: threading.Event, what: str, done: Callable[[], bool]
) -> bool:
    """Feed ``on_line`` until the process exits (False) or ``done()`` (True)."""
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
        if done():
            return True
    proc.wait()
    return False


def kill_group(proc: subprocess.Popen[Any], grace_s: float = GRACE_S) -> None:
    """Stop ``proc`` and everything in its process group: SIGTERM (so the worker cleans up), then SIGKILL
    after ``grace_s`` seconds.

    Waits for the whole group, not only the leader: a task the leader started
    may still be writing when the leader is gone.
    """
    pgid = proc.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else GRACE_S)
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or its zombie keeps the group "alive"
            if not _group_alive(pgid):
                break
            time.sleep(0.05)
        if not _group_alive(pgid):
            break
    proc.wait()


# Variables set in the orchestrator's own environment, as it runs, to what a worker sets itself too:
# torch's inductor cache (on import, a default under the temp dir) and the S3 checksum policy (when
# storage is first opened, from the same settings the workload carries). Their appearance after a
# standby started does not make it differ from a new worker.
_SELF_SET = frozenset({"TORCHINDUCTOR_CACHE_DIR", "AWS_REQUEST_CHECKSUM_CALCULATION"})


@dataclass
class Standby:
    """A process started ahead of its workload, idle on its stdin until handed one (EOF: it exits by itself)."""

    proc: subprocess.Popen[str]
    env: dict[str, str]
    cwd: str
    ready: int
    """Read end of a pipe the process closes once it is prepared (EOF: prepared, or dead)."""

    exited = "it"  # how :meth:`unusable` names the process (a class attribute, not a field)

    def usable(self, env: Mapping[str, str], cwd: str) -> bool:
        return not self.unusable(env, cwd)

    def unusable(self, env: Mapping[str, str], cwd: str) -> str:
        """Why this standby cannot run a workload started with ``env`` in ``cwd``; empty if it can."""
        if self.proc.poll() is not None:
            return f"{self.exited} exited with code {self.proc.returncode}"
        if self.cwd != cwd:
            return f"the working directory changed from {self.cwd} to {cwd}"
        was = self.env
        changed = sorted(k for k in {*was, *env} if was.get(k) != env.get(k) and not (k in _SELF_SET and k not in was))
        return f"the environment changed since it started ({', '.join(changed)})" if changed else ""

    def discard(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # EOF: an idle standby exits by itself
        except OSError:
            pass
        kill_group(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.close_ready()

    def close_ready(self) -> None:
        if self.ready >= 0:
            os.close(self.ready)
            self.ready = -1



def discard_standbys(pool: dict[Any, Standby], lock: threading.Lock) -> None:
    """Discard every standby left in ``pool`` (registered with ``atexit``: none outlives its starter)."""
    with lock:
        standbys = list(pool.values())
        pool.clear()
    for standby in standbys:
        standby.discard()

def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs. Zombies do not count: what they held is released,
    and whoever reaps them (init, for those the leader left) may take seconds to."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:  # no procfs (macOS): a group with only zombies left counts as running
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")".
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


# ---------------------------------------------------------------- process trees that outlive their starter

TREE_ENV = "AIPLANE_PROCESS_TREE"
"""In the environment of every process of a tree :func:`start_tree` started: that tree's own random value."""


def start_tree(
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    output: IO[Any] | None = None,
    record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start ``cmd`` detached, as the root of a process tree aiplane owns; return it and its handle.

    The root gets a session (and process group) of its own, so no signal aimed
    at the starter reaches it, and exactly ``env`` plus :data:`TREE_ENV` set to a
    value of its own (and ``SPT_NOENV``, which keeps that value readable). Every
    process it starts inherits that value, whatever group or session it moves
    to, and it survives the root: the handle (``pid``, ``token``, ``tree``; JSON,
    to be recorded) lets :func:`stop_tree` find and stop them all, from any
    process, after a ``kill -9`` of the root too. ``output`` takes stdout and
    stderr (default: this process's).

    ``record`` is called with the handle before anything can interrupt the
    starter: a SIGTERM or SIGINT that arrives between the start and the end of
    ``record`` is held, and delivered once it returned (called from the main
    thread; elsewhere signals do not interrupt Python code anyway). So a
    cancelled starter never leaves a running tree nobody wrote down. If
    ``record`` raises, the tree is killed and the error re-raised.
    """
    marker = secrets.token_hex(16)
    with _signals_held():
        # setproctitle (vLLM names its processes with it) overwrites /proc/<pid>/environ, and the marker with it,
        # unless SPT_NOENV is set.
        proc = subprocess.Popen(
            list(cmd), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT if output is not None else None,
            cwd=cwd, env={**env, "SPT_NOENV": "1", TREE_ENV: marker}, start_new_session=True,
        )  # fmt: skip
        handle = {"pid": proc.pid, "token": process_token(proc.pid), "tree": marker}
        if record is not None:
            try:
                record(dict(handle))
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # microseconds old: nothing of it has left its group yet
                proc.wait()
                raise
    return proc, handle


@contextlib.contextmanager
def _signals_held(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Hold ``signums`` while the block runs, then act on the first that came as its handler would have.

    The worker turns a SIGTERM into an exception (:mod:`aiplane.core.worker`); raised
    between starting a process and writing down its handle, it would leave that
    process running with nobody knowing it. Only the main thread runs handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    # A handler installed from C (getsignal gives None) could not be put back: such a signal is left alone.
    previous = {n: signal.signal(n, lambda n, frame: came.append(n)) for n in signums if signal.getsignal(n) is not None}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if came:  # delivered on an error in the block too: the process was still asked to stop
            handler = previous[came[0]]
            if callable(handler):
                handler(came[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), came[0])


def tree_processes(handle: Mapping[str, Any]) -> list[int]:
    """The running processes of the tree ``handle`` names (from :func:`start_tree`), its root first if it runs.

    A process belongs to it when it carries the tree's :data:`TREE_ENV` value,
    or is in the root's process group while that group is the tree's (its root
    is the process started, by its start token, or a marked process is in it):
    that catches a child that cleared its environment. Zombies have ended and
    are left out. Never a process that merely reuses one of the tree's pids.
    A handle without ``tree`` (a process not started by :func:`start_tree`)
    names the root's process group, while its root runs. Needs psutil (the
    ``serve`` extra), imported here only.
    """
    root = handle.get("pid")
    return sorted((p.pid for p in _members(handle)), key=lambda pid: pid != root)


def _members(handle: Mapping[str, Any]) -> list[Any]:
    import psutil

    marker, root, token = handle.get("tree"), handle.get("pid"), handle.get("token")
    if not isinstance(root, int) or root <= 0:
        return []
    root_ours = bool(token) and _start_token(root) == token
    marked, grouped, marked_in_group = [], [], False
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            in_group = os.getpgid(proc.pid) == root
            if marker and _carries(proc, marker):
                marked.append(proc)
                marked_in_group = marked_in_group or in_group
            elif in_group:
                grouped.append(proc)
        except (psutil.Error, OSError):
            continue  # ended meanwhile
    return marked + (grouped if root_ours or marked_in_group else [])


def _carries(proc: psutil.Process, marker: str) -> bool:
    import psutil

    try:
        return proc.environ().get(TREE_ENV) == marker
    except psutil.AccessDenied:
        return False  # another user's process


def stop_tree(handle: Mapping[str, Any], grace_s: float = GRACE_S) -> bool:
    """Stop every process of the tree ``handle`` names: SIGTERM, then SIGKILL what is left after ``grace_s``.

    Works without the root (killed, or reaped elsewhere) and from any process;
    returns whether any process of the tree was running. Waits until none is
    (a zombie has ended: the process that started the root reaps it, or init).
    """
    import psutil

    members = _members(handle)
    if not members:
        return False
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, GRACE_S)):
        for proc in members:
            # psutil checks the process is still the one found (its start time), so a reused pid is spared.
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        deadline = time.monotonic() + wait_s
        while members and time.monotonic() < deadline:
            time.sleep(0.1)
            members = _members(handle)
        if not members:
            break
    return True


# ---------------------------------------------------------------- working directories

WORKDIR_PREFIX = "aiplane-"
"""Every working directory :func:`workload_dir` makes is named ``aiplane-<label>-<random>``."""
OWNER_FILE = ".aiplane-owner.json"
"""Inside a working directory: the pid, start time and host of the process that owns it."""


@contextlib.contextmanager
def workload_dir(label: str, dir: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """A fresh private directory ``aiplane-<label>-*`` for one run, removed when the block ends.

    Like :class:`tempfile.TemporaryDirectory`, plus a record of this process
    (pid, start time, host) in :data:`OWNER_FILE`: if this process dies without
    leaving the block, :func:`sweep_orphaned_workdirs` sees that the owner is
    gone and removes the directory. ``dir`` defaults to :func:`tempfile.gettempdir`.
    """
    with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{label}-", dir=dir) as tmp:
        path = Path(tmp)
        _write_owner(path, os.getpid())
        yield path


def sweep_orphaned_workdirs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the working directories under ``root`` whose owning process is gone; return them.

    ``root`` defaults to :func:`tempfile.gettempdir` (``$TMPDIR``), where
    :func:`workload_dir` puts them. Only directories named ``aiplane-*`` that
    carry an owner record, belong to this user and were made on this host are
    considered; one is removed when its owner pid is not running, or is
    running but started at another time than the owner did (the pid was
    reused). A directory whose owner cannot be checked is kept. Safe to run
    while other aiplane processes run: their directories have live owners.
    """
    root = Path(root) if root is not None else Path(tempfile.gettempdir())
    host, uid = socket.gethostname(), _uid()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(WORKDIR_PREFIX):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if uid is not None and entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            owner = json.loads(Path(entry.path, OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, not readable, or still being made: leave it
        if not isinstance(owner, dict) or owner.get("host") != host or not _owner_gone(owner):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            removed.append(Path(entry.path))
    return removed


def _uid() -> int | None:
    getuid = getattr(os, "getuid", None)
    return getuid() if getuid is not None else None


def _write_owner(path: Path, pid: int) -> None:
    record = {"pid": pid, "start": _start_token(pid), "host": socket.gethostname()}
    # Written beside, then renamed: a sweep sees the whole record or none (and then leaves the directory).
    tmp = path / f"{OWNER_FILE}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path / OWNER_FILE)


def process_token(pid: int | None = None) -> str:
    """When ``pid`` (default: this process) started, as an opaque string, so a reused pid is told apart."""
    return _start_token(pid if pid is not None else os.getpid()) or ""


def process_gone(pid: int, token: str) -> bool:
    """Whether the process that had ``pid`` and :func:`process_token` ``token`` has ended; ``False`` when unsure."""
    return _owner_gone({"pid": pid, "start": token})


def _owner_gone(owner: Mapping[str, Any]) -> bool:
    pid, recorded = owner.get("pid"), owner.get("start")
    if not isinstance(pid, int) or pid <= 0:
        return False
    now = _start_token(pid)
    if now is None:
        return True  # not running
    if not now or not isinstance(recorded, str) or now.partition(":")[0] != recorded.partition(":")[0]:
        return False  # running, and we cannot tell whether it is the owner: keep
    return now != recorded  # running, but a later process with the owner's pid


def _start_token(pid: int) -> str | None:
    """When ``pid`` started, as an opaque string; ``None`` if it is not running; ``""`` if that cannot be told.

    Two processes that had the same pid get different tokens. On Linux this is
    the boot id and the start time in ``/proc/<pid>/stat``; elsewhere psutil's
    create time, when psutil is installed. The part before the first ``:`` names
    the source; tokens from different sources are not compared.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # a Linux /proc without this pid: not running
        return _start_token_portable(pid)
    except OSError:
        return _start_token_portable(pid)
    # Fields after the command name (which may hold spaces and parentheses): state is field 3, starttime field 22.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None  # a zombie has finished
    return f"proc:{_boot_id()}:{int(fields[19])}"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_token_portable(pid: int) -> str | None:
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # running, as another user
        return ""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"psutil:{proc.create_time()!r}"
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        return ""
