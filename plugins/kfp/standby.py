"""A kfp.local runner started ahead of its run: ``_local.py --standby``, kfp already imported.

Each local run is one runner process (kfp.local keeps process-wide state), and
starting one and importing kfp is most of what kfp.local adds to a task. So the
engine keeps one runner waiting: :meth:`KfpEngine.prestart` starts it, and each
local run starts the next one once it is done, for the next task. A run is handed
the waiting runner only if it would have started the same one (interpreter,
environment, working directory); an unused runner exits when its starter does.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aiplane.core.processes import kill_group, start_process

__all__ = ["prestart", "take"]

# Set in the orchestrator's environment as it runs, to what a workload sets itself too (see the
# local engine): their appearance after a runner started does not make it differ from a new one.
_SELF_SET = frozenset({"TORCHINDUCTOR_CACHE_DIR", "AWS_REQUEST_CHECKSUM_CALCULATION"})


@dataclass
class _Runner:
    proc: subprocess.Popen
    env: dict[str, str]
    cwd: str
    ready: int
    """Read end of a pipe the runner closes once kfp is imported (EOF: imported, or dead)."""

    def unusable(self, env: Mapping[str, str], cwd: str) -> str:
        if self.proc.poll() is not None:
            return f"it exited with code {self.proc.returncode}"
        if self.cwd != cwd:
            return f"the working directory changed from {self.cwd} to {cwd}"
        was = self.env
        changed = sorted(k for k in {*was, *env} if was.get(k) != env.get(k) and not (k in _SELF_SET and k not in was))
        return f"the environment changed since it started ({', '.join(changed)})" if changed else ""

    def discard(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # EOF: an idle runner exits by itself
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


_RUNNERS: dict[tuple[str, str], _Runner] = {}
_LOCK = threading.Lock()


def prestart(python: str, runner: str, env: Mapping[str, str], wait_s: float = 0.0) -> bool:
    """Start a runner for the next run with ``python`` (one per interpreter; a second call keeps the first).

    Returns whether it has imported kfp within ``wait_s`` seconds.
    """
    key, env, cwd = (python, runner), dict(env), os.getcwd()
    with _LOCK:
        waiting = _RUNNERS.get(key)
        if waiting is not None and waiting.unusable(env, cwd):
            del _RUNNERS[key]
            waiting.discard()
            waiting = None
        if waiting is None:
            waiting = _start(python, runner, env, cwd)
            _RUNNERS[key] = waiting
        ready = os.dup(waiting.ready)  # a run may take the runner (and close its pipe) while this waits
    try:
        imported = bool(select.select([ready], [], [], max(0.0, wait_s))[0])
    finally:
        os.close(ready)
    return imported and waiting.proc.poll() is None


def take(python: str, runner: str, env: Mapping[str, str], argv: Sequence[str], tmpdir: str) -> tuple[subprocess.Popen | None, str]:
    """The waiting runner, now running ``argv`` with ``tmpdir`` as its TMPDIR, or ``None`` and why the one
    there could not take it (empty if there was none)."""
    with _LOCK:
        waiting = _RUNNERS.pop((python, runner), None)
    if waiting is None:
        return None, ""
    why = waiting.unusable(env, os.getcwd())
    if not why:
        try:
            assert waiting.proc.stdin is not None
            waiting.proc.stdin.write(json.dumps({"argv": list(argv), "tmpdir": tmpdir}) + "\n")
            waiting.proc.stdin.close()
        except (OSError, ValueError):
            why = "it could not be handed the run"
        finally:
            waiting.close_ready()
    if why:
        waiting.discard()
        return None, why
    return waiting.proc, ""


def _start(python: str, runner: str, env: dict[str, str], cwd: str) -> _Runner:
    ready, ready_w = os.pipe()
    try:
        proc = start_process([python, runner, "--standby", str(ready_w)], env=env, stdin=subprocess.PIPE, pass_fds=(ready_w,))
    except BaseException:
        os.close(ready)
        raise
    finally:
        os.close(ready_w)
    return _Runner(proc, env, cwd, ready)


@atexit.register
def _discard_all() -> None:
    with _LOCK:
        runners = list(_RUNNERS.values())
        _RUNNERS.clear()
    for waiting in runners:
        waiting.discard()
