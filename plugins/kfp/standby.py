"""A kfp.local runner started ahead of its run: ``_local.py --standby``, kfp already imported.

Each local run is one runner process (kfp.local keeps process-wide state), and
starting one and importing kfp is most of what kfp.local adds to a task. So the
engine keeps one runner waiting: :meth:`KfpEngine.prestart` starts it, and each
local run starts the next one once it is done, for the next task. A run is handed
the waiting runner only if it would have started the same one (interpreter,
environment, working directory); an unused runner exits when its starter does.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence

from aiplane.core.engines import StandbyPool, start_standby
from aiplane.core.processes import Standby

__all__ = ["prestart", "take"]


class _Runner(Standby):
    """A ``kfp.local`` runner started ahead of its run; its ``ready`` pipe closes once kfp is imported."""


# By (interpreter, runner script): one waiting runner each.
_RUNNERS: StandbyPool[_Runner] = StandbyPool()
_discard_all = _RUNNERS.discard_all


def prestart(python: str, runner: str, env: Mapping[str, str], wait_s: float = 0.0) -> bool:
    """Start a runner for the next run with ``python`` (one per interpreter; a second call keeps the first).

    Returns whether it has imported kfp within ``wait_s`` seconds.
    """
    env, cwd = dict(env), os.getcwd()

    def start() -> _Runner:
        proc, ready = start_standby(lambda fd: [python, runner, "--standby", str(fd)], env)
        return _Runner(proc, env, cwd, ready)

    return _RUNNERS.prestart((python, runner), env, cwd, start, wait_s)


def take(
    python: str, runner: str, env: Mapping[str, str], argv: Sequence[str], tmpdir: str
) -> tuple[subprocess.Popen | None, str]:
    """The waiting runner, now running ``argv`` with ``tmpdir`` as its TMPDIR, or ``None`` and why the one
    there could not take it (empty if there was none)."""
    line = json.dumps({"argv": list(argv), "tmpdir": tmpdir})
    waiting, why = _RUNNERS.take((python, runner), env, os.getcwd(), line)
    return (waiting.proc if waiting else None), why
