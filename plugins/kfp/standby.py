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

from aiplane.core.processes import Standby, discard_standbys, start_process

__all__ = ["prestart", "take"]


class _Runner(Standby):
    """A ``kfp.local`` runner started ahead of its run; its ``ready`` pipe closes once kfp is imported."""


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
    discard_standbys(_RUNNERS, _LOCK)
