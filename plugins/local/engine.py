"""The ``local`` engine: each workload runs in its own subprocess on this machine.

A subprocess, not the Dagster process: the workload gets a clean interpreter
(the same one Ray workers and KFP containers would start), can be killed as a
whole process group on cancellation, and cannot leak state into the orchestrator.

Starting that interpreter and importing what the workload needs (torch and
transformers take seconds) can be done ahead of time: :meth:`LocalEngine.prestart`
starts a standby worker for an entry point, and the next run of that entry point
is handed to it. It is still a fresh process that runs that one workload only.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from aiplane.core.components import Engine
from aiplane.core.config import Target
from aiplane.core.errors import WorkloadError
from aiplane.core.processes import Standby, discard_standbys, follow_process, start_process, workload_dir
from aiplane.core.workload import Event, Workload, WorkloadResult, parse_event, read_result

__all__ = ["LocalEngine"]

_TAIL = 30


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    python: str | None = None
    """Interpreter to run workloads with; defaults to the one running aiplane."""


class LocalEngine(Engine):
    """Runs a workload with ``python -m aiplane.core.worker`` in a subprocess."""

    name = "local"
    Settings = _Settings

    def run(
        self,
        workload: Workload,
        target: Target,
        on_event: Callable[[Event], None],
        cancel: threading.Event | None = None,
    ) -> WorkloadResult:
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL)

        def on_line(line: str) -> None:
            event = parse_event(line)
            if event.type == "log":
                tail.append(event.message)
            on_event(event)

        python, env = self._python(), _environment()
        # Records this process as its owner: if it is killed, `aiplane up` sweeps the directory later.
        with workload_dir(workload.name) as tmp:
            spec, result = Path(tmp, "workload.json"), Path(tmp, "result.json")
            spec.write_text(workload.model_dump_json())
            started = time.monotonic()
            proc, unused = _take_standby(python, workload.entrypoint, env, spec, result)
            prestarted = proc is not None
            if unused:
                on_line(f"the prestarted worker for {workload.entrypoint} was not used: {unused}")
            if proc is None:
                proc = start_process([python, "-m", _WORKER, str(spec), str(result)], env=env)
            follow_process(proc, on_line, cancel, what=f"workload {workload.name} ({workload.run_id})")
            duration = time.monotonic() - started
            if proc.returncode != 0 and not result.exists():
                raise WorkloadError(
                    f"Workload {workload.name} ({workload.run_id}) exited with code {proc.returncode} "
                    "and no result. Last output:\n" + "\n".join(tail)
                )
            outcome = read_result(result, workload)
        facts = {"engine": self.name, "target": target.name, "pid": proc.pid, "duration_s": round(duration, 3)}
        if prestarted:
            facts["prestarted"] = True
        return outcome.model_copy(update={"engine": facts})

    def prestart(self, entrypoint: str, preload: Sequence[str] = (), wait_s: float = 0.0) -> bool:
        """Start the worker for the next workload that runs ``entrypoint`` now, importing ``preload``.

        The next :meth:`run` of a workload with this entry point, on this interpreter,
        with the same environment and working directory, is handed to it instead of
        starting an interpreter then; it runs that one workload exactly as a worker
        started for it would (own session, killed on cancellation). Call it where there
        is time to spare before the workload, e.g. while ``aiplane up`` checks the
        deployment. One standby per entry point: a second call keeps the first. An unused
        one ends when this process does (or is replaced if the environment changed).

        Returns whether it finished importing within ``wait_s`` seconds (0: do not wait).
        """
        module = entrypoint.partition(":")[0]
        key, env, cwd = (self._python(), entrypoint), _environment(), os.getcwd()
        with _STANDBY_LOCK:
            standby = _STANDBYS.get(key)
            if standby is not None and not standby.usable(env, cwd):
                del _STANDBYS[key]
                standby.discard()
                standby = None
            if standby is None:
                standby = _Standby.start(key[0], [*preload, module], env, cwd)
                _STANDBYS[key] = standby
            # A copy: a run may take the standby (and close its pipe) while this waits.
            ready = os.dup(standby.ready)
        try:
            imported = bool(select.select([ready], [], [], max(0.0, wait_s))[0])
        finally:
            os.close(ready)
        return imported and standby.proc.poll() is None

    def _python(self) -> str:
        return self.settings.python or sys.executable


_WORKER = "aiplane.core.worker"


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


class _Standby(Standby):
    """A worker started ahead of its workload (``python -m aiplane.core.worker --standby``).

    Its ``ready`` pipe closes once it has imported what it preloads.
    """

    @classmethod
    def start(cls, python: str, preload: Sequence[str], env: dict[str, str], cwd: str) -> "_Standby":
        ready, ready_w = os.pipe()
        try:
            cmd = [python, "-m", _WORKER, "--standby", "--preload", ",".join(preload), "--ready-fd", str(ready_w)]
            proc = start_process(cmd, env=env, stdin=subprocess.PIPE, pass_fds=(ready_w,))
        except BaseException:
            os.close(ready)
            raise
        finally:
            os.close(ready_w)
        return cls(proc, env, cwd, ready)

    def hand_over(self, spec: Path, result: Path) -> bool:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"spec": str(spec), "result": str(result)}) + "\n")
            self.proc.stdin.close()
        except (OSError, ValueError):
            return False
        finally:
            self.close_ready()
        return True


_STANDBYS: dict[tuple[str, str], _Standby] = {}
_STANDBY_LOCK = threading.Lock()


def _take_standby(
    python: str, entrypoint: str, env: dict[str, str], spec: Path, result: Path
) -> tuple[subprocess.Popen | None, str]:
    """The prestarted worker for ``entrypoint``, now running the workload in ``spec``, or ``None``
    and why the one there was could not take it (empty if there was none)."""
    with _STANDBY_LOCK:
        standby = _STANDBYS.pop((python, entrypoint), None)
    if standby is None:
        return None, ""
    why = standby.unusable(env, os.getcwd())
    if not why and not standby.hand_over(spec, result):
        why = "it could not be handed the workload"
    if why:
        standby.discard()
        return None, why + "; a new worker runs it"
    return standby.proc, ""


@atexit.register
def _discard_standbys() -> None:
    discard_standbys(_STANDBYS, _STANDBY_LOCK)
