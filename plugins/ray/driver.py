"""``python -m aiplane.plugins.ray.driver``: the Ray driver that trains one workload with Ray Train.

The Ray engine starts this process either on this machine (with a private Ray
it starts here) or on a cluster as the entrypoint of a Ray Job. It reads the
workload and the run's settings from ``$AIPLANE_RAY_SPEC``, runs the workload on
a :class:`ray.train.torch.TorchTrainer` (one :func:`~.worker.train_loop` per
worker) and writes to stdout what the engine reads back from the process or the
job logs: one event line per event, then one result line.

Recovery is Ray Train's: ``FailureConfig(max_failures)`` replaces failed
workers and they resume from the last checkpoint registered under
``storage_path``. The run's checkpoint directory is removed when the run ends,
whatever the outcome, so checkpoints a crash left unregistered go with it.
SIGTERM (the engine's cancel, ``ray job stop``) aborts the training run
through Ray Train's controller, so no worker actor or placement group outlives it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiplane.core.errors import AiplaneError, WorkloadCancelled, WorkloadError
from aiplane.core.worker import preload
from aiplane.core.workload import Event, Workload, WorkloadResult, format_event

from .monitor import summarize
from .worker import EventSink, Mailbox, train_loop

__all__ = ["main", "SPEC_ENV", "RESULT_PREFIX"]

SPEC_ENV = "AIPLANE_RAY_SPEC"
RESULT_PREFIX = "@@aiplane-ray-result "
_DRAIN_S = 0.25


def main(argv: list[str] | None = None) -> int:
    """Train the workload in ``$AIPLANE_RAY_SPEC`` and print its events, then its result line.

    ``--standby READY_FD``: ``$AIPLANE_RAY_SPEC`` holds the run's settings, without a
    workload. Start the private Ray and, unless checkpoints go to S3 (whose credentials
    come with the workload), Ray Train's workers too: each imports the spec's
    ``preload`` and waits for the workload (:class:`~.worker.Mailbox`). Close READY_FD
    once they all wait (or Ray is up, when they cannot start early), then read the whole
    spec as one line on stdin and train as above; EOF instead: stop the workers and Ray,
    remove the directory and exit.
    """
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(os.environ[SPEC_ENV])
    if args[:1] == ["--standby"]:
        return _standby(spec, int(args[1]))
    return _answer(Workload.model_validate(spec["workload"]), lambda emit, cancelled: _drive(spec, emit, cancelled, None))


def _answer(
    workload: Workload,
    drive: Callable[[Callable[[Event], None], threading.Event], dict[str, Any]],
    cancelled: threading.Event | None = None,
) -> int:
    """Run ``drive(emit, cancelled)`` and print its payload as the result line; the exit code."""
    cancelled = cancelled or threading.Event()
    try:
        payload = drive(_emit, cancelled)
    except (KeyboardInterrupt, WorkloadCancelled):
        payload = _error(WorkloadCancelled(f"workload {workload.name} ({workload.run_id}) was cancelled"))
    except Exception as exc:  # the engine raises it again from the result line
        payload = _error(exc)
        _emit(Event(type="log", message=f"ray driver failed: {type(exc).__name__}: {exc}"))
    print(RESULT_PREFIX + json.dumps(payload), flush=True)
    # The result is out and the run's checkpoints are gone: what is left is stopping Ray, which takes
    # seconds. The engine need not wait for it (it stops a local Ray's processes itself), and a
    # SIGTERM from here on simply ends this process.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import ray

    ray.shutdown()
    return 1 if "error" in payload else 0


def _emit(event: Event) -> None:
    print(format_event(event), flush=True)


def _standby(setup: dict[str, Any], ready_fd: int) -> int:
    init_s = _init(setup)
    preload(["ray.train.torch"])  # what fit imports anyway (Ray Train, its torch trainer and torch)
    if _early(setup):
        return _standby_early(setup, ready_fd, init_s)
    os.close(ready_fd)  # the engine sees EOF: Ray is up
    line = sys.stdin.readline()
    if not line.strip():
        return _unused(setup)
    spec = json.loads(line)
    return _answer(Workload.model_validate(spec["workload"]), lambda emit, cancelled: _drive(spec, emit, cancelled, init_s))


def _unused(setup: dict[str, Any]) -> int:
    """A standby not used (its starter let it go, or died): its Ray and its directory end with it; the exit code."""
    import ray

    ray.shutdown()
    shutil.rmtree(setup["directory"], ignore_errors=True)
    return 0


def _early(setup: dict[str, Any]) -> bool:
    """Whether Ray Train's workers can start before the workload is known: not with checkpoints in S3, whose
    filesystem is opened with the workload's own storage settings."""
    return not str(setup.get("storage_path") or "").startswith("s3://")


def _error(exc: BaseException) -> dict[str, str]:
    kind = type(exc).__name__ if isinstance(exc, AiplaneError) else "WorkloadError"
    return {"error_type": kind, "error": str(exc) if isinstance(exc, AiplaneError) else f"{type(exc).__name__}: {exc}"}


def _drive(spec: dict[str, Any], emit: Callable[[Event], None], cancelled: threading.Event, init_s: float | None) -> dict[str, Any]:
    if init_s is None:
        init_s = _init(spec)
    _install_sigterm(cancelled)
    return _fit(spec, Workload.model_validate(spec["workload"]), emit, cancelled, init_s)


def _init(spec: dict[str, Any]) -> float:
    """Start this run's private Ray (``spec["local"]``) or join the Ray Job's cluster; the seconds it took."""
    import ray

    started = time.monotonic()
    local = spec.get("local")
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if spec.get("runtime_env") and local:
        options["runtime_env"] = spec["runtime_env"]
    if local:
        # Token auth, with the token the engine gave this run in RAY_AUTH_TOKEN (RAY_AUTH_MODE=token):
        # Ray neither generates one nor saves it to ~/.ray/auth_token.
        ray.init(
            num_cpus=local["num_cpus"],
            num_gpus=local["num_gpus"],
            include_dashboard=False,
            # Ray still runs a headless dashboard process; its default port (8265) may be someone else's.
            dashboard_port=_free_port(),
            _temp_dir=local["temp_dir"],
            **options,
        )
    else:
        ray.init(**options)  # the cluster of the Ray Job this driver is (RAY_ADDRESS)
    return time.monotonic() - started


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _install_sigterm(cancelled: threading.Event) -> None:
    """SIGTERM cancels: Ray Train's own SIGINT handler (set while ``fit`` runs) aborts the run gracefully."""

    def on_term(signum, frame):
        cancelled.set()
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


class _Pump(threading.Thread):
    """Drains the event sink every quarter second and prints what the workers sent."""

    def __init__(self, sink: Any, emit: Callable[[Event], None]):
        super().__init__(name="aiplane-ray-events", daemon=True)
        self.sink, self.emit = sink, emit
        self.starts: list[dict[str, Any]] = []
        self.stats: dict[str, dict[str, Any]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(_DRAIN_S):
            self.drain()

    def drain(self) -> None:
        import ray

        try:
            events, starts, stats = ray.get(self.sink.drain.remote(), timeout=30)
        except Exception:  # the sink is gone (shutdown); what it held is lost, training is not
            return
        for info in starts:
            self.starts.append(info)
            self.emit(Event(type="log", message=f"ray worker rank {info['rank']} started: pid {info['pid']} on {info['host']}"))
        for raw in events:
            self.emit(Event.model_validate_json(raw))
        self.stats.update(stats)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.drain()


def _fit(
    spec: dict[str, Any], workload: Workload, emit: Callable[[Event], None], cancelled: threading.Event, init_s: float
) -> dict[str, Any]:
    import ray

    sink = ray.remote(num_cpus=0)(EventSink).remote()
    storage = spec.get("storage_path") or os.path.expanduser("~/ray_results")
    # Checkpoints in object storage go through the workload's own storage settings (endpoint,
    # keys by reference, resolved here on the cluster), not whatever AWS_* the nodes happen to have.
    filesystem = None
    if storage.startswith("s3://"):
        filesystem, storage = workload.storage().filesystem(storage)
    run_name = f"aiplane-{workload.name}-{workload.run_id}-{uuid.uuid4().hex[:6]}"
    trainer = _trainer(spec, {"workload": workload.model_dump_json()}, sink, run_name, storage, filesystem)
    given = time.time()
    fitted = _run_fit(trainer, _Pump(sink, emit), storage, run_name, filesystem)
    return _payload(fitted, spec, workload, cancelled, given, {"ray_init_s": round(init_s, 3)})


def _standby_early(setup: dict[str, Any], ready_fd: int, init_s: float) -> int:
    """The standby whose Train workers start before the workload is known, then wait for it; the exit code.

    ``trainer.fit()`` runs in the main thread (Ray Train aborts on SIGINT there, and
    SIGTERM is made to do the same); a thread reads the hand-over from stdin and puts
    the workload in the workers' :class:`~.worker.Mailbox`, another closes READY_FD once
    every worker waits. Should the early fit end before a worker took the workload (it
    failed to start, or was handed settings it was not started with), the workload runs
    on a fresh fit, as without a standby.
    """
    import ray

    cancelled = threading.Event()
    _install_sigterm(cancelled)
    mailbox = ray.remote(num_cpus=0)(Mailbox).remote()
    sink = ray.remote(num_cpus=0)(EventSink).remote()
    storage = setup.get("storage_path") or os.path.expanduser("~/ray_results")
    run_name = f"aiplane-standby-{uuid.uuid4().hex[:12]}"
    trainer = _trainer(setup, {"mailbox": mailbox, "preload": list(setup.get("preload") or ())}, sink, run_name, storage, None)
    handover = _HandOver(setup, mailbox)
    ended = threading.Event()
    threading.Thread(target=_ready_when_waiting, args=(ready_fd, mailbox, setup["num_workers"], ended), daemon=True).start()
    fitted: _Fitted | None = None
    try:
        fitted = _run_fit(trainer, _Pump(sink, _emit), storage, run_name, None)
    except KeyboardInterrupt:  # aborted: a cancel after the hand-over (answered below), or a kill before it
        pass
    finally:
        ended.set()
    spec = handover.wait()
    if spec is None:
        return _unused(setup)  # the workers are gone with the fit
    workload = Workload.model_validate(spec["workload"])

    def drive(emit: Callable[[Event], None], cancelled: threading.Event) -> dict[str, Any]:
        if cancelled.is_set() or fitted is None:
            raise WorkloadCancelled(f"workload {workload.name} ({workload.run_id}) was cancelled")
        if not fitted.pump.starts:
            return _fit(spec, workload, emit, cancelled, init_s)
        return _payload(fitted, spec, workload, cancelled, handover.at,
                        {"ray_init_s": round(init_s, 3), "workers_started_ahead": True})  # fmt: skip

    return _answer(workload, drive, cancelled)


class _HandOver(threading.Thread):
    """Reads the hand-over line from stdin and gives the workload to the waiting workers (EOF: ``None``)."""

    _STANDBY_ONLY = ("directory", "preload")  # the rest of the setup is the run's settings, as a spec holds them

    def __init__(self, setup: dict[str, Any], mailbox: Any):
        super().__init__(name="aiplane-ray-handover", daemon=True)
        self.setup, self.mailbox = setup, mailbox
        self.spec: dict[str, Any] | None = None
        self.at = 0.0
        """When the workload came (wall clock): the run's clock for its workers' start-up starts here."""
        self.start()

    def run(self) -> None:
        import ray

        given = None
        try:
            line = sys.stdin.readline()
            self.at = time.time()
            spec = self.spec = json.loads(line) if line.strip() else None
            # Settings the workers were not started with (the engine keys standbys by them, so only by mistake):
            # they are let go, and the workload runs on a fresh fit.
            if spec is not None and all(spec.get(k) == v for k, v in self.setup.items() if k not in self._STANDBY_ONLY):
                given = json.dumps(spec["workload"])
        finally:  # whatever came (a line that is not a spec: nothing), the workers are told, so the fit ends
            with contextlib.suppress(Exception):  # the fit is over already: nobody is left to take it
                ray.get(self.mailbox.put.remote(given), timeout=30)

    def wait(self) -> dict[str, Any] | None:
        self.join()
        return self.spec


def _ready_when_waiting(fd: int, mailbox: Any, workers: int, ended: threading.Event) -> None:
    """Close the standby's READY pipe once ``workers`` wait in ``mailbox``, or the fit has ended."""
    import ray

    try:
        while not ended.is_set():
            with contextlib.suppress(Exception):  # a slow or lost actor: asked again, until the fit ends
                if ray.get(mailbox.waiting.remote(), timeout=5) >= workers:
                    return
            ended.wait(0.1)
    finally:
        os.close(fd)


@dataclass
class _Fitted:
    """One ``trainer.fit()``: its result or failure, when it ended (wall clock), and what its workers told."""

    run_name: str
    result: Any
    failure: BaseException | None
    ended: float
    pump: _Pump


def _run_fit(trainer: Any, pump: _Pump, storage: str, run_name: str, filesystem: Any) -> _Fitted:
    pump.start()
    failure: BaseException | None = None
    result = None
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError: max_failures used up, or a controller error
        failure = exc
    finally:
        pump.stop()
        _remove_run_dir(storage, run_name, filesystem)
    return _Fitted(run_name, result, failure, time.time(), pump)


def _payload(
    fitted: _Fitted, spec: dict[str, Any], workload: Workload, cancelled: threading.Event, given: float, facts: dict[str, Any]
) -> dict[str, Any]:
    """The result line's payload for ``workload``, whose workers were given it at ``given`` (wall clock)."""
    import ray

    pump = fitted.pump
    attempts = sum(1 for s in pump.starts if s["rank"] == 0)
    if cancelled.is_set():
        raise WorkloadCancelled(f"workload {workload.name} ({workload.run_id}) was cancelled")
    if fitted.failure is not None:
        raise WorkloadError(
            f"training on Ray failed after {attempts} attempt(s) (max_failures={spec['max_failures']}): "
            f"{type(fitted.failure).__name__}: {fitted.failure}"
        )
    result = fitted.result
    if result is None or not result.return_value:
        raise WorkloadError(f"training on Ray ended without a result from rank 0 (run {fitted.run_name})")
    payload = json.loads(result.return_value)
    if "error" in payload:
        return payload
    outcome = WorkloadResult.model_validate(payload)
    first_start = min((s["time"] for s in pump.starts), default=None)
    facts = {
        "ray_job_id": ray.get_runtime_context().get_job_id(),
        "ray_run_name": fitted.run_name,
        "num_workers": spec["num_workers"],
        "use_gpu": spec["use_gpu"],
        "attempts": attempts,
        **facts,
        # From the workers being given the workload to the first one running it: worker processes, imports,
        # process group (those done ahead by a standby are not counted).
        "worker_start_s": round(max(0.0, first_start - given), 3) if first_start else None,
        "fit_s": round(fitted.ended - given, 3),
        "tokens_per_s": outcome.metrics.get("tokens_per_s"),
        "workers": pump.stats,
        **summarize(pump.stats),
    }
    return outcome.model_copy(update={"engine": facts}).model_dump(mode="json")


def _trainer(spec: dict[str, Any], source: dict[str, Any], sink: Any, run_name: str, storage: str, filesystem: Any) -> Any:
    """Ray Train's TorchTrainer for the workload: its workers, their resources, failures to recover from, checkpoints.

    ``source`` says where each worker gets the workload: ``{"workload": json}``, or
    ``{"mailbox": handle, "preload": modules}`` for workers started before it is known."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = spec.get("resources_per_worker") or None
    gpus_per_worker = (resources or {}).get("GPU", 1 if spec["use_gpu"] else 0)
    return TorchTrainer(
        train_loop,  # type: ignore[arg-type]  # Ray's stubs say a loop returns None; its return value is result.return_value
        train_loop_config={
            **source,
            "sink": sink,
            "checkpoint_every": spec["checkpoint_every"],
            "monitor_interval_s": spec["monitor_interval_s"],
            "gpus_per_worker": gpus_per_worker,
        },
        scaling_config=ScalingConfig(
            num_workers=spec["num_workers"], use_gpu=spec["use_gpu"], resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=spec["max_failures"]),
            # Two, not one: the newest may be half-registered when a worker dies during the report.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def _remove_run_dir(storage: str, run_name: str, filesystem=None) -> None:
    """Delete the run's directory (its checkpoints, registered or not) from local or remote storage."""
    import pyarrow.fs

    try:
        if filesystem is not None:
            fs, base = filesystem, storage
        elif "://" in storage:
            fs, base = pyarrow.fs.FileSystem.from_uri(storage)
        else:
            fs, base = pyarrow.fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(storage))
        fs.delete_dir(f"{base.rstrip('/')}/{run_name}")
    except (FileNotFoundError, OSError):
        pass


if __name__ == "__main__":
    sys.exit(main())
