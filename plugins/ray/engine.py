"""The ``ray`` engine: training workloads on Ray Train, distributed, recoverable and observed.

Two ways to reach Ray, one driver (:mod:`aiplane.plugins.ray.driver`):

* ``address`` unset or ``local``: a private Ray for this run only. The driver
  runs as a subprocess in its own session, starts Ray with its own temp dir,
  free ports and a token of its own, kept in memory (``ray.init(num_cpus=...)``),
  and the whole process group is gone when the run ends or is cancelled; nobody
  else's Ray is touched and nothing is written to the home directory.
* ``address: http://<head>:8265``: an existing cluster (KubeRay on OpenShift AI)
  through its dashboard. The driver is submitted as a Ray Job, its logs are
  tailed back as events, and cancellation stops the job. A cluster with token
  auth on needs ``auth_token``, a reference to where the token is; a token file
  of this machine (``~/.ray/auth_token``) is never what the engine reads.

Either way the events reach ``on_event`` as they happen and the rank-0 result,
with per-worker resource use, comes back as the engine's result.

Starting a private Ray takes seconds (its head's processes, then Ray Train's
controller and worker processes importing torch): :meth:`RayEngine.prestart`
does all of it while the orchestrator is busy with something else, up to
workers waiting for a workload, and the next local run is handed to them; that
Ray then ends with the run as any other. Stopping it is not waited for either:
once the driver has printed its result, the engine kills the run's process
group, Ray's processes with it, and removes its directory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import queue
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from aiplane.core.engines import EngineBase, EngineRun, StandbyPool, hand_over, start_standby
from aiplane.core.config import SecretRef
from aiplane.core.errors import ConfigError, WorkloadCancelled, WorkloadError
from aiplane.core.processes import Standby, follow_process, stream_process
from aiplane.core.workload import Event, Workload, WorkloadResult, parse_event, read_result

__all__ = ["RayEngine", "RaySettings"]

_SPEC_ENV = "AIPLANE_RAY_SPEC"  # the driver's SPEC_ENV; kept here so listing plugins does not import the driver
_RESULT_PREFIX = "@@aiplane-ray-result "
_TAIL = 40
_GRACE_S = 20.0
# Ray Train's controller polls its workers this often (default 2 s). A report made
# while the previous one is unread blocks until the next poll, and a dead worker is
# noticed only at a poll; half a second keeps both short for a negligible cost.
_HEALTH_CHECK_S = "0.5"
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_URL = re.compile(r"^https?://[^/\s:]+(:\d{1,5})?/?$")
# Settings of this process's Ray, or of the cluster it talks to, that a private local Ray must not inherit.
_NOT_INHERITED = frozenset({"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"})


def _must(cond: bool, message: str) -> None:
    if not cond:
        raise PydanticCustomError("invalid_setting", message)


class RaySettings(BaseModel):
    """Settings of the ``ray`` engine (a target's ``settings`` in a deployment)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = None
    """``None`` or ``local``: start a private Ray for each run; else a cluster's dashboard URL, e.g. ``http://raycluster-head-svc:8265``."""
    num_workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Per worker, e.g. ``{CPU: 4, GPU: 1}``; empty: Ray Train's default (1 CPU, plus 1 GPU with use_gpu)."""
    storage_path: str | None = None
    """Where checkpoints go: a path every node sees (a PVC mount) or a URI (``s3://...``). Local default: the run's temp dir."""
    max_failures: int = 2
    """Worker-group failures to recover from, resuming from the last checkpoint (-1: unlimited)."""
    checkpoint_every: int = 50
    """Training steps between checkpoints; 0 disables them (a failure then restarts from step 0)."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Ray runtime environment for the driver and workers (``env_vars``, ``pip``, ``working_dir``, ...)."""
    python: str = "python"
    """The interpreter with aiplane installed that runs the Ray Job's driver on the cluster."""
    auth_token: SecretRef | None = None
    """Bearer token for the dashboard (Ray token auth, or an OpenShift OAuth proxy), by reference.

    Unset: the cluster must have auth off (the engine checks, and says what to set if not);
    the engine looks for no token elsewhere, such as ``~/.ray/auth_token``."""
    connect_timeout_s: float = 10.0
    """How long to wait for the dashboard before saying it cannot be reached."""
    monitor_interval_s: float = 1.0
    """Seconds between resource samples in each worker; 0 turns sampling off."""

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None or v == "local":
            return None
        _must(
            bool(_URL.match(v.strip())),
            f"address must be 'local' or the Ray dashboard URL, e.g. http://raycluster-head-svc:8265 (got {v!r}); "
            "ray:// client addresses and GCS host:port addresses are not used by this engine",
        )
        return v.strip().rstrip("/")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        _must(v >= 1, f"num_workers must be >= 1 (got {v})")
        return v

    @field_validator("max_failures")
    @classmethod
    def _failures(cls, v: int) -> int:
        _must(v >= -1, f"max_failures must be >= -1 (got {v}; -1 means unlimited)")
        return v

    @field_validator("checkpoint_every")
    @classmethod
    def _every(cls, v: int) -> int:
        _must(v >= 0, f"checkpoint_every must be >= 0 (got {v}; 0 disables checkpoints)")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        _must(all(amount >= 0 for amount in v.values()), f"resources_per_worker amounts must be >= 0 (got {v})")
        return v

    @field_validator("connect_timeout_s", "monitor_interval_s")
    @classmethod
    def _seconds(cls, v: float, info) -> float:
        _must(v >= 0, f"{info.field_name} must be >= 0 (got {v})")
        return v


class RayEngine(EngineBase[RaySettings]):
    """Runs a workload on Ray Train's TorchTrainer: a private local Ray, or a cluster through Ray Jobs."""

    name = "ray"
    Settings = RaySettings

    def locations(self) -> dict[str, str]:
        # Unset, checkpoints stay on the cluster's own nodes (local mode: this run's temp dir), in its region.
        storage_path = self.settings.storage_path
        return {"storage_path": storage_path} if storage_path else {}

    def execute(self, run: EngineRun) -> tuple[WorkloadResult, dict[str, Any]]:
        if self.settings.address is None:
            outcome, facts = self._run_local(run.workload, run.on_event, run.cancel)
        else:
            outcome, facts = self._run_job(run.workload, run.on_event, run.cancel)
        return outcome, {**facts, **outcome.engine}  # the driver's own facts: workers, resource use

    # -- what the driver needs -------------------------------------------------------------

    def _spec(self, workload: Workload, local: dict[str, Any] | None, storage_path: str | None) -> str:
        return json.dumps({"workload": workload.model_dump(mode="json"), **self._run_settings(local, storage_path)})

    def _run_settings(self, local: dict[str, Any] | None, storage_path: str | None) -> dict[str, Any]:
        """What the driver needs besides the workload (a standby starts Ray Train's workers with it)."""
        s = self.settings
        return {
            "local": local,
            "num_workers": s.num_workers,
            "use_gpu": s.use_gpu,
            "resources_per_worker": s.resources_per_worker,
            "storage_path": storage_path,
            "max_failures": s.max_failures,
            "checkpoint_every": s.checkpoint_every,
            "monitor_interval_s": s.monitor_interval_s,
            "runtime_env": s.runtime_env,
        }

    def _storage_path(self, head: "_Head") -> str:
        return self.settings.storage_path or str(head.tmp / "storage")

    def _per_worker(self, resource: str, default: float) -> float:
        s = self.settings
        return float(s.resources_per_worker.get(resource, default))

    # -- a private local Ray ------------------------------------------------------------------

    def prestart(self, entrypoint: str, preload: Sequence[str] = (), wait_s: float = 0.0) -> bool:
        """Start the next local run's private Ray now, and Ray Train's workers with it, waiting for the workload.

        Local mode only (a cluster is up already). The driver starts Ray as :meth:`run`
        would and calls ``fit()`` with these settings; each worker process imports the
        entrypoint's module and ``preload``, and waits. The next local run with these
        settings, on this interpreter, environment and working directory, is handed to
        it: its workload goes to the waiting workers, which run it as they would have
        from a cold start. One not used is stopped (its process group) when this process
        ends. A second call keeps the first. With checkpoints in S3 (reached with the
        workload's own credentials) only Ray is started ahead.

        Returns whether every worker waits (Ray is up, with S3 checkpoints) within ``wait_s`` seconds (0: do not wait).
        """
        s = self.settings
        if s.address is not None:
            return False
        env, cwd = _inherited(), os.getcwd()
        modules = list(dict.fromkeys([entrypoint.partition(":")[0], *preload]))

        def start() -> _Standby:
            head = self._head()
            setup = {**self._run_settings(head.local, self._storage_path(head)), "directory": str(head.tmp), "preload": modules}
            return _Standby.start(head, env, cwd, setup)

        return _STANDBYS.prestart(self._standby_key(), env, cwd, start, wait_s)

    def _standby_key(self) -> tuple[str, str]:
        return sys.executable, self.settings.model_dump_json()

    def _head(self) -> "_Head":
        """A new private Ray's temp dir, ``ray.init`` arguments and driver environment (no workload yet)."""
        s = self.settings
        # Under /tmp, short: Ray's unix socket paths must stay under 108 bytes.
        tmp = Path(tempfile.mkdtemp(prefix="aiplane-ray-", dir="/tmp"))
        local = {
            "num_cpus": max(1, int(round(s.num_workers * self._per_worker("CPU", 1)))),
            "num_gpus": int(s.num_workers * self._per_worker("GPU", 1 if s.use_gpu else 0)),
            "temp_dir": str(tmp / "ray"),
        }
        env = {
            **_inherited(),
            **{k: str(v) for k, v in (s.runtime_env.get("env_vars") or {}).items()},
            "PYTHONUNBUFFERED": "1",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": _HEALTH_CHECK_S,
            # A new local Ray turns token auth on and, with no token at hand, generates one and saves
            # it to ~/.ray/auth_token, where every later `ray start` and ray.init() on this machine finds
            # it and switches to token mode too. This run's Ray gets its own token instead, in the
            # environment its processes inherit: authenticated, and nothing written to the home directory.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
        }
        return _Head(tmp, local, env)

    def _run_local(self, workload: Workload, on_event, cancel: threading.Event) -> tuple[WorkloadResult, dict[str, Any]]:
        standby, unused = _STANDBYS.take(self._standby_key(), _inherited(), os.getcwd())
        if unused:
            on_event(Event(type="log", message=f"the prestarted Ray was not used: {unused}; a new Ray runs it"))
        head = standby.head if standby else self._head()
        try:
            spec = self._spec(workload, head.local, self._storage_path(head))
            reader = _Lines(on_event)
            what = f"workload {workload.name} on a local Ray"
            # Own session: Ray's processes are the driver's children, so the group is this run's Ray and
            # nothing else; cancelling, or an exception here (Dagster's run termination), kills the group.
            if standby is not None:
                # Not handed (the driver died): following it reports its exit and last output, as for any driver.
                hand_over(standby, spec)
                proc = follow_process(standby.proc, reader.feed, cancel, what=what, done=reader.done)
            else:
                cmd = [sys.executable, "-m", "aiplane.plugins.ray.driver"]
                proc = stream_process(cmd, reader.feed, cancel, env={**head.env, _SPEC_ENV: spec}, what=what, done=reader.done)
            outcome = reader.result(workload, f"the Ray driver (pid {proc.pid}) exited with code {proc.returncode}")
            facts: dict[str, Any] = {"mode": "local", "driver_pid": proc.pid}
            if standby is not None:
                facts["prestarted"] = True
            return outcome, facts
        finally:
            shutil.rmtree(head.tmp, ignore_errors=True)

    # -- an existing cluster, through Ray Jobs ----------------------------------------------

    def _headers(self) -> dict[str, str]:
        s = self.settings
        return {"Authorization": f"Bearer {s.auth_token.resolve()}"} if s.auth_token else {}

    def _client(self):
        """A JobSubmissionClient for the dashboard, after a quick probe that fails in seconds, clearly."""
        import requests

        s = self.settings
        assert s.address is not None
        headers = self._headers()
        try:
            reply = requests.get(f"{s.address}/api/version", headers=headers, timeout=s.connect_timeout_s)
        except requests.RequestException as exc:
            raise WorkloadError(
                f"Cannot reach the Ray dashboard at {s.address} ({type(exc).__name__}: {exc}). Check the target's "
                "settings.address (the RayCluster head service's dashboard port, usually 8265) and that the cluster is up."
            ) from None
        if reply.status_code in (401, 403):
            raise ConfigError(
                f"The Ray dashboard at {s.address} refused the request (HTTP {reply.status_code}): it needs a token. "
                + (
                    "The token in settings.auth_token was not accepted."
                    if s.auth_token
                    else "Set the target's settings.auth_token, e.g. {env: RAY_AUTH_TOKEN}, and export that variable."
                )
            )
        try:
            version = reply.json()
        except ValueError:
            version = None
        if reply.status_code != 200 or not isinstance(version, dict) or "ray_version" not in version:
            raise WorkloadError(
                f"{s.address} answered HTTP {reply.status_code} to /api/version, not as a Ray dashboard does. "
                "settings.address must be the dashboard URL of the Ray head, e.g. http://raycluster-head-svc:8265."
            )
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(s.address, headers=headers or None), version

    def _run_job(self, workload: Workload, on_event, cancel: threading.Event) -> tuple[WorkloadResult, dict[str, Any]]:
        s = self.settings
        client, version = self._client()
        env_vars = {
            **{k: str(v) for k, v in (s.runtime_env.get("env_vars") or {}).items()},
            _SPEC_ENV: self._spec(workload, None, s.storage_path),
            "PYTHONUNBUFFERED": "1",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": _HEALTH_CHECK_S,
            # Time for the driver to abort the run gracefully on `stop` before the supervisor kills it.
            "RAY_JOB_STOP_WAIT_TIME_S": str(int(_GRACE_S)),
        }
        job_id = f"aiplane-{workload.name}-{workload.run_id}-{secrets.token_hex(3)}"
        client.submit_job(
            entrypoint=f"{shlex.quote(s.python)} -m aiplane.plugins.ray.driver",
            submission_id=job_id,
            runtime_env={**s.runtime_env, "env_vars": env_vars},
            metadata={"aiplane_workload": workload.name, "aiplane_run_id": workload.run_id},
        )
        on_event(Event(type="log", message=f"submitted Ray job {job_id} to {s.address}"))
        reader = _Lines(on_event)
        try:
            status = self._follow(client, job_id, reader, cancel)
        except BaseException:  # cancelled or interrupted too: the Ray job is stopped, then re-raised
            _stop_job(client, job_id, on_event, s.address)
            raise
        facts = {"mode": "job", "address": s.address, "ray_submission_id": job_id, "ray_version": version.get("ray_version")}
        if reader.payload is None:
            info = client.get_job_info(job_id)
            raise WorkloadError(
                f"Ray job {job_id} ended {status} without a result: {info.message or 'no message'}. "
                "Last output:\n" + "\n".join(reader.tail)
            )
        return reader.result(workload, f"Ray job {job_id} ended {status}"), facts

    @staticmethod
    def _follow(client, job_id: str, reader: "_Lines", cancel: threading.Event) -> str:
        """Stream the job's logs into ``reader`` until the result line or the job's end; the job's status.

        The result line is the driver's last word: the seconds it then takes to shut
        down and for Ray to mark the job finished are not waited for.
        """
        chunks: queue.Queue[Any] = queue.Queue()

        def tail() -> None:
            async def follow() -> None:
                async for chunk in client.tail_job_logs(job_id):
                    chunks.put(chunk)

            try:
                asyncio.run(follow())
            except Exception as exc:  # no websocket through this proxy: fall back to polling
                chunks.put(exc)
            chunks.put(None)

        threading.Thread(target=tail, name=f"tail-{job_id}", daemon=True).start()
        polling, status, next_status = False, "PENDING", 0.0
        while True:
            if cancel.is_set():
                raise WorkloadCancelled(f"Ray job {job_id} was cancelled")
            if reader.done():
                return "RESULT"
            now = time.monotonic()
            if now >= next_status:
                status, next_status = str(client.get_job_status(job_id).value), now + 1.0
            if polling:
                reader.feed_text(client.get_job_logs(job_id)[reader.consumed :])
                if status in _TERMINAL:
                    reader.feed_text(client.get_job_logs(job_id)[reader.consumed :], final=True)
                    return status
                time.sleep(0.5)
                continue
            try:
                chunk = chunks.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(chunk, Exception):
                polling = True
            elif chunk is None:
                if not polling:
                    reader.feed_text("", final=True)
                    return str(client.get_job_status(job_id).value)
            else:
                reader.feed_text(chunk)


class _Lines:
    """Turns driver output into events, keeps the last lines for errors, and catches the result line."""

    def __init__(self, on_event: Callable[[Event], None]):
        self.on_event = on_event
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL)
        self.payload: str | None = None
        self.consumed = 0
        self._partial = ""

    def feed_text(self, text: str, final: bool = False) -> None:
        self.consumed += len(text)
        text = self._partial + text
        lines = text.split("\n")
        self._partial = "" if final else lines.pop()
        for line in lines:
            if line:
                self.feed(line)

    def done(self) -> bool:
        """Whether the result line came: the driver's last word (stopping Ray after it is not waited for)."""
        return self.payload is not None

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        if line.startswith(_RESULT_PREFIX):
            self.payload = line[len(_RESULT_PREFIX) :]
            return
        event = parse_event(line)
        if event.type == "log":
            self.tail.append(event.message)
        self.on_event(event)

    def result(self, workload: Workload, how: str) -> WorkloadResult:
        if self.payload is None:
            raise WorkloadError(
                f"Workload {workload.name} ({workload.run_id}): {how} and no result. Last output:\n" + "\n".join(self.tail)
            )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "result.json")
            path.write_text(self.payload)
            return read_result(path, workload)


def _stop_job(client, job_id: str, on_event: Callable[[Event], None], address: str | None,
              wait_s: float = _GRACE_S + 10) -> None:
    """Stop the job and wait until Ray says it ended, so its actors and placement groups are gone.

    Best effort: this runs on the way out with the run's own error, which must stay
    the one raised; a stop that failed or could not be confirmed is said in the log,
    with the command that finishes it.
    """
    finish = f"stop it with: ray job stop {job_id} --address {address}"
    try:
        client.stop_job(job_id)
    except Exception as exc:  # any client or network failure: told, never raised over the run's own error
        _tell(on_event, f"Ray job {job_id}: stop failed ({type(exc).__name__}: {exc}); {finish}")
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if str(client.get_job_status(job_id).value) in _TERMINAL:
                return
        except Exception as exc:  # as above: the stop was asked for, only its end is not known
            _tell(on_event, f"Ray job {job_id}: stop asked, its end not confirmed ({type(exc).__name__}); {finish}")
            return
        time.sleep(0.2)
    _tell(on_event, f"Ray job {job_id}: still not stopped {wait_s:.0f} s after the stop was asked; {finish}")


def _tell(on_event: Callable[[Event], None], message: str) -> None:
    with contextlib.suppress(Exception):  # the log sink failing too: the run's own error is what must be seen
        on_event(Event(type="log", message=message))


def _inherited() -> dict[str, str]:
    # A private Ray must not join whatever cluster this process was pointed at, nor use its credentials.
    return {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}


@dataclass
class _Head:
    """A private Ray's temp dir (removed after its run), ``ray.init`` arguments and driver environment."""

    tmp: Path
    local: dict[str, Any]
    env: dict[str, str]


@dataclass
class _Standby(Standby):
    """A driver started ahead of its workload (``driver --standby``): its Ray and Train workers are up, or coming up.

    Its ``env`` is what it inherited from this process; its ``ready`` pipe closes once every worker waits.
    """

    head: _Head
    exited = "its driver"

    @classmethod
    def start(cls, head: _Head, inherited: dict[str, str], cwd: str, setup: dict[str, Any]) -> "_Standby":
        cmd = [sys.executable, "-m", "aiplane.plugins.ray.driver", "--standby"]
        try:
            proc, ready = start_standby(lambda fd: [*cmd, str(fd)], {**head.env, _SPEC_ENV: json.dumps(setup)})
        except BaseException:  # interrupted too: the head's temporary directory goes; re-raised
            shutil.rmtree(head.tmp, ignore_errors=True)
            raise
        return cls(proc, inherited, cwd, ready, head)

    def discard(self) -> None:
        super().discard()  # EOF: the driver stops its Ray and exits
        shutil.rmtree(self.head.tmp, ignore_errors=True)


# The prestarted driver of the next local run, by (interpreter, settings).
_STANDBYS: StandbyPool[_Standby] = StandbyPool()
_take_standby = _STANDBYS.take
_discard_standbys = _STANDBYS.discard_all
