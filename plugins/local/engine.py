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

import collections
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from aiplane.core.engines import EngineBase, EngineRun, StandbyPool, start_standby
from aiplane.core.errors import WorkloadError
from aiplane.core.processes import Standby, follow_process, start_process, workload_dir
from aiplane.core.workload import WorkloadResult, parse_event, read_result

__all__ = ["LocalEngine"]

_TAIL = 30


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    python: str | None = None
    """Interpreter to run workloads with; defaults to the one running aiplane."""


class LocalEngine(EngineBase[_Settings]):
    """Runs a workload with ``python -m aiplane.core.worker`` in a subprocess."""

    name = "local"
    Settings = _Settings

    def execute(self, run: EngineRun) -> tuple[WorkloadResult, dict[str, Any]]:
        workload = run.workload
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL)

        def on_line(line: str) -> None:
            event = parse_event(line)
            if event.type == "log":
                tail.append(event.message)
            run.on_event(event)

        python, env = self._python(), _environment()
        # Records this process as its owner: if it is killed, `aiplane up` sweeps the directory later.
        with workload_dir(workload.name) as tmp:
            spec, result = Path(tmp, "workload.json"), Path(tmp, "result.json")
            spec.write_text(workload.model_dump_json())
            handed = json.dumps({"spec": str(spec), "result": str(result)})
            standby, unused = _STANDBYS.take((python, workload.entrypoint), env, os.getcwd(), handed)
            if unused:
                on_line(f"the prestarted worker for {workload.entrypoint} was not used: {unused}; a new worker runs it")
            proc = standby.proc if standby else start_process([python, "-m", _WORKER, str(spec), str(result)], env=env)
            follow_process(proc, on_line, run.cancel, what=f"workload {workload.name} ({workload.run_id})")
            if proc.returncode != 0 and not result.exists():
                raise WorkloadError(
                    f"Workload {workload.name} ({workload.run_id}) exited with code {proc.returncode} "
                    "and no result. Last output:\n" + "\n".join(tail)
                )
            outcome = read_result(result, workload)
        return outcome, {"pid": proc.pid, **({"prestarted": True} if standby else {})}

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
        python, env, cwd = self._python(), _environment(), os.getcwd()
        cmd = [python, "-m", _WORKER, "--standby", "--preload", ",".join([*preload, module]), "--ready-fd"]

        def start() -> Standby:
            proc, ready = start_standby(lambda fd: [*cmd, str(fd)], env)
            return Standby(proc, env, cwd, ready)

        return _STANDBYS.prestart((python, entrypoint), env, cwd, start, wait_s)

    def _python(self) -> str:
        return self.settings.python or sys.executable


_WORKER = "aiplane.core.worker"


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


# A worker started ahead of its workload (``python -m aiplane.core.worker --standby``); its ``ready``
# pipe closes once it has imported what it preloads. By (interpreter, entry point).
_STANDBYS: StandbyPool[Standby] = StandbyPool()
_discard_standbys = _STANDBYS.discard_all
