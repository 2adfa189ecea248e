"""The ``kfp`` engine: every workload materializes as a versioned Kubeflow Pipelines v2 run.

A workload compiles to a one-task pipeline (:mod:`aiplane.plugins.kfp.pipeline`)
whose task runs the workload with the installed aiplane, exactly as the
``local`` engine's subprocess does. The pipeline version is named by the digest
of its compiled spec, so the same code and configuration reuse one version.

``mode: remote`` uploads the version (once) to a KFP / OpenShift AI pipeline
server and runs it there (:mod:`aiplane.plugins.kfp.remote`); ``mode: local``
runs the same compiled spec offline with ``kfp.local`` in a subprocess group.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiplane.core.artifacts import atomic_write_text
from aiplane.core.config import Deployment, Target
from aiplane.core.engines import EngineBase, EngineRun
from aiplane.core.errors import AiplaneError, WorkloadError
from aiplane.core.kube import pod_storage_problems
from aiplane.core.processes import follow_process, stream_process, workload_dir
from aiplane.core.storage import Storage, normalize_uri
from aiplane.core.workload import (
    EVENT_PREFIX,
    Event,
    Workload,
    WorkloadResult,
    parse_event,
    parse_result,
    read_result,
)

from . import standby
from .settings import KfpSettings

if TYPE_CHECKING:
    from .pipeline import CompiledPipeline

__all__ = ["KfpEngine"]

_TAIL = 40
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_KFP_LOG_PREFIX = re.compile(r"^\d\d:\d\d:\d\d\.\d+ - [A-Z]+ - ")
_TASK_INDENT = "    "  # kfp.local indents what a task prints
_LOCAL_RUNNER = str(Path(__file__).with_name("_local.py"))  # run by path: see its docstring


class KfpEngine(EngineBase[KfpSettings]):
    """Runs each workload as a Kubeflow Pipelines v2 run (remote DSP server, or ``kfp.local``)."""

    name = "kfp"
    Settings = KfpSettings

    def locations(self) -> dict[str, str]:
        s = self.settings
        if s.mode != "remote":
            return {"pipeline_root": s.pipeline_root} if s.pipeline_root else {}
        # Unset, the server's default bucket gets the task outputs: somewhere aiplane cannot hold to a region.
        return {"results_dir": s.results_dir or "", "pipeline_root": s.pipeline_root or ""}

    def check(self, deployment: Deployment) -> list[str]:
        """Remote: storage credentials the pipeline's pods must get by Secret reference."""
        return pod_storage_problems(deployment, "KFP pipeline run") if self.settings.mode == "remote" else []

    def execute(self, run: EngineRun) -> tuple[WorkloadResult, dict[str, Any]]:
        if self.settings.mode == "remote":
            return self._run_remote(run)
        return self._run_local(run)

    def prestart(self, entrypoint: str, preload: Sequence[str] = (), wait_s: float = 0.0) -> bool:
        """Local mode: start the kfp.local runner of the next run now (its interpreter, kfp imported).

        Each local run also starts the runner of the next one when it is done. A run is
        handed the waiting runner only if it would have started the same one; an unused
        one exits with this process. ``preload`` is the task's business: a task is a new
        process kfp.local starts. Remote mode prepares nothing (``False``).
        """
        if self.settings.mode == "remote":
            return False
        return standby.prestart(self._python(), _LOCAL_RUNNER, _environment(), wait_s)

    def _python(self) -> str:
        return self.settings.python or sys.executable

    def compile(self, workload: Workload, target: Target, result_path: str = "") -> "CompiledPipeline":
        """The pipeline this engine would run ``workload`` as (IR YAML, digest, run arguments)."""
        from .pipeline import compile_workload

        return compile_workload(workload, target, self.settings, result_path)

    def _metadata(self, compiled: "CompiledPipeline", **extra: Any) -> dict[str, Any]:
        return {
            "mode": self.settings.mode,
            "pipeline": compiled.name,
            "pipeline_version": compiled.version,
            "pipeline_digest": compiled.digest,
            **extra,
        }

    # -- remote ---------------------------------------------------------------------------------

    def _run_remote(self, engine_run: EngineRun) -> tuple[WorkloadResult, dict[str, Any]]:
        from .remote import KfpRemote

        workload, on_event = engine_run.workload, engine_run.on_event

        s = self.settings
        assert s.results_dir is not None  # the settings validator requires it for remote mode
        # Unique per attempt: a retried Dagster step must not read the previous attempt's result.
        # results_dir is object storage (s3://...) or a volume both sides mount; the pod writes
        # there with the workload's own storage settings, and this process reads it back.
        storage = workload.storage()
        result = f"{normalize_uri(s.results_dir).rstrip('/')}/kfp-results/{workload.name}-{workload.run_id}-{uuid.uuid4().hex[:8]}.json"
        compiled = self.compile(workload, engine_run.target, result)  # ConfigError here: nothing sent yet
        remote = KfpRemote(s)
        run = remote.start(compiled, display_name=f"{workload.name} {workload.run_id}")
        try:
            engine_run.log(
                f"KFP run {run.run_id} of {compiled.name} version {compiled.version} "
                f"({'reused' if run.version_reused else 'uploaded'}): {run.url}"
            )
            final = remote.wait(run, on_event, engine_run.cancel)
        except BaseException:  # every way out but success terminates the cluster run; re-raised
            # Cancelled, timed out, or the caller was interrupted (Dagster run termination):
            # the run on the cluster must not keep going.
            remote.terminate(run, on_event)
            raise
        state = str(final.state).upper()
        try:
            if state != "SUCCEEDED":
                if storage.exists(result):
                    # The workload itself failed: raise its own aiplane error, as every engine does.
                    _read(storage, result, workload, run.url)
                error = getattr(final, "error", None)
                detail = f": {getattr(error, 'message', '') or error}" if error else ""
                raise WorkloadError(
                    f"KFP run of {workload.name} ({workload.run_id}) ended {state}{detail}. See {run.url}"
                )
            if not storage.exists(result):
                raise WorkloadError(
                    f"KFP run {run.url} succeeded but wrote no result to {result}: results_dir {s.results_dir!r} "
                    "must be object storage the pods can write (s3://...), or a volume mounted at the same path "
                    "here and in the pipeline pods."
                )
            outcome = _read(storage, result, workload, run.url)
        finally:
            with contextlib.suppress(AiplaneError):
                storage.delete(result)
        return outcome, self._metadata(
            compiled,
            run_id=run.run_id,
            run_url=run.url,
            pipeline_id=run.pipeline_id,
            pipeline_version_id=run.version_id,
            version_reused=run.version_reused,
            experiment_id=run.experiment_id,
            host=s.host,
        )

    # -- local ----------------------------------------------------------------------------------

    def _run_local(self, run: EngineRun) -> tuple[WorkloadResult, dict[str, Any]]:
        workload = run.workload
        root = Path(self.settings.pipeline_root or Path(tempfile.gettempdir()) / "aiplane-kfp").expanduser().absolute()
        with workload_dir(f"kfp-{workload.name}") as tmp:
            result, args, out = Path(tmp, "result.json"), Path(tmp, "arguments.json"), Path(tmp, "out.json")
            compiled = self.compile(workload, run.target, str(result))
            spec = _keep_spec(root, compiled)
            args.write_text(json.dumps(compiled.arguments))
            # kfp.local's task script (`mktemp -d`) and a crashed task leave temporary files
            # behind; giving the run its own TMPDIR removes them with this directory.
            task_tmp = Path(tmp, "tmp")
            task_tmp.mkdir()
            tail: collections.deque[str] = collections.deque(maxlen=_TAIL)
            output = _LocalOutput(tail)

            def on_line(line: str) -> None:
                event = output.event(line)
                if event is not None:
                    run.on_event(event)

            python, env, what = self._python(), _environment(), f"kfp.local run of {workload.name} ({workload.run_id})"
            argv = [str(spec), str(args), str(out), str(root)]
            proc, unused = standby.take(python, _LOCAL_RUNNER, env, argv, str(task_tmp))
            if unused:
                run.log(f"the prestarted kfp.local runner was not used: {unused}")
            prestarted = proc is not None
            if proc is not None:
                follow_process(proc, on_line, run.cancel, what=what)
            else:
                env_tmp = {**env, "TMPDIR": str(task_tmp)}
                proc = stream_process([python, _LOCAL_RUNNER, *argv], on_line, run.cancel, env=env_tmp, what=what)
            # The next task's runner starts now, while this process records this one's outcome.
            standby.prestart(python, _LOCAL_RUNNER, env)
            if not result.exists():
                raise WorkloadError(
                    f"kfp.local run of {workload.name} ({workload.run_id}) exited with code {proc.returncode} "
                    "and no result. Last output:\n" + "\n".join(tail)
                )
            outcome = read_result(result, workload)  # a failed workload raises its own aiplane error here
            facts = json.loads(out.read_text()) if out.exists() else {}
        run_dir = facts.get("run_dir", "")
        return outcome, self._metadata(
            compiled,
            run_id=Path(run_dir).name if run_dir else None,
            run_url=Path(run_dir).as_uri() if run_dir else None,
            result_artifact=facts.get("result_artifact"),
            pipeline_spec=str(spec),
            pid=proc.pid,
            **({"prestarted": True} if prestarted else {}),
        )


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _read(storage: Storage, result: str, workload: Workload, url: str) -> WorkloadResult:
    """The result the task wrote; its error, if it wrote one, raised with its class and the run's URL."""
    try:
        return parse_result(storage.read_bytes(result).decode(), workload)
    except AiplaneError as exc:
        raise type(exc)(f"{exc} (KFP run: {url})") from None


def _keep_spec(root: Path, compiled: "CompiledPipeline") -> Path:
    """The local stand-in for the server's version store: ``<root>/.pipelines/<name>/<version>.yaml``."""
    path = root / ".pipelines" / compiled.name / f"{compiled.version}.yaml"
    if not path.exists():
        atomic_write_text(path, compiled.spec)
    return path


class _LocalOutput:
    """Turns kfp.local's output into events: aiplane events, status lines and what the task prints.

    kfp.local logs status lines with a timestamp prefix and prints the task's
    output indented between "Streamed logs:" and the next status line; in there,
    the KFP executor's own chatter (including a JSON dump of its whole input) is dropped.
    """

    def __init__(self, tail: collections.deque[str]):
        self.tail = tail
        self._in_task = False
        self._in_executor_input = False

    def event(self, raw: str) -> Event | None:
        line = _ANSI.sub("", raw.rstrip("\n"))
        text = line.strip()
        if text.startswith(EVENT_PREFIX):
            event = parse_event(text)
            if event.type == "log":
                self.tail.append(event.message)
            return event
        if _KFP_LOG_PREFIX.match(text):
            self._in_task = self._in_executor_input = False
            message = _KFP_LOG_PREFIX.sub("", text)
            self.tail.append(message)
            if message == "Streamed logs:":
                self._in_task = True
                return None
            return None if message.endswith("outputs:") else Event(type="log", message=message)
        if not self._in_task or not text:
            return None
        if self._in_executor_input:
            if line.rstrip() == _TASK_INDENT + "}" or text.startswith("[KFP Executor"):
                self._in_executor_input = False
            return None
        if "Got executor_input:" in text:
            self._in_executor_input = True
            return None
        self.tail.append(text)
        return None if text.startswith("[KFP Executor") else Event(type="log", message=text)


