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
from typing import Any

from aiplane.core.errors import AiplaneError, WorkloadCancelled, WorkloadError
from aiplane.core.workload import Event, Workload, WorkloadResult, format_event

from .monitor import summarize
from .worker import EventSink, train_loop

__all__ = ["main", "SPEC_ENV", "RESULT_PREFIX"]

SPEC_ENV = "AIPLANE_RAY_SPEC"
RESULT_PREFIX = "@@aiplane-ray-result "
_DRAIN_S = 0.25


def main(argv: list[str] | None = None) -> int:
    """Train the workload in ``$AIPLANE_RAY_SPEC`` and print its events, then its result line.

    ``--standby READY_FD``: ``$AIPLANE_RAY_SPEC`` holds only how to start the private
    Ray (``local``, ``runtime_env``, and the ``directory`` it is in). Start it and
    import Ray Train, close READY_FD, then read the whole spec as one line on stdin
    and train as above; EOF instead: stop Ray, remove the directory and exit.
    """
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(os.environ[SPEC_ENV])
    init_s = None
    if args[:1] == ["--standby"]:
        init_s = _init(spec)
        _preload()
        os.close(int(args[1]))  # the engine sees EOF: Ray is up
        line = sys.stdin.readline()
        if not line.strip():
            import ray

            # Not used (its starter let it go, or died): this Ray and its directory end with the standby.
            ray.shutdown()
            shutil.rmtree(spec["directory"], ignore_errors=True)
            return 0
        spec = json.loads(line)
    workload = Workload.model_validate(spec["workload"])
    cancelled = threading.Event()

    def emit(event: Event) -> None:
        print(format_event(event), flush=True)

    try:
        payload = _drive(spec, workload, emit, cancelled, init_s)
    except (KeyboardInterrupt, WorkloadCancelled):
        payload = _error(WorkloadCancelled(f"workload {workload.name} ({workload.run_id}) was cancelled"))
    except Exception as exc:  # the engine raises it again from the result line
        payload = _error(exc)
        emit(Event(type="log", message=f"ray driver failed: {type(exc).__name__}: {exc}"))
    print(RESULT_PREFIX + json.dumps(payload), flush=True)
    return 1 if "error" in payload else 0


def _preload() -> None:
    """What ``fit`` imports anyway (Ray Train, its torch trainer and torch), while the driver waits."""
    try:
        import ray.train.torch  # noqa: F401
    except Exception:  # any import failure: the run imports it again and reports it where it belongs
        pass


def _error(exc: BaseException) -> dict[str, str]:
    kind = type(exc).__name__ if isinstance(exc, AiplaneError) else "WorkloadError"
    return {"error_type": kind, "error": str(exc) if isinstance(exc, AiplaneError) else f"{type(exc).__name__}: {exc}"}


def _drive(
    spec: dict[str, Any], workload: Workload, emit: Callable[[Event], None], cancelled: threading.Event, init_s: float | None
) -> dict[str, Any]:
    import ray

    if init_s is None:
        init_s = _init(spec)
    _install_sigterm(cancelled)
    try:
        return _fit(spec, workload, emit, cancelled, init_s)
    finally:
        ray.shutdown()


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
    trainer = _trainer(spec, workload, sink, run_name, storage, filesystem)
    pump = _Pump(sink, emit)
    pump.start()
    fit_started, fit_started_wall = time.monotonic(), time.time()
    failure: BaseException | None = None
    result = None
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError: max_failures used up, or a controller error
        failure = exc
    finally:
        pump.stop()
        _remove_run_dir(storage, run_name, filesystem)
    fit_s = time.monotonic() - fit_started
    attempts = sum(1 for s in pump.starts if s["rank"] == 0)
    if cancelled.is_set():
        raise WorkloadCancelled(f"workload {workload.name} ({workload.run_id}) was cancelled")
    if failure is not None:
        raise WorkloadError(
            f"training on Ray failed after {attempts} attempt(s) (max_failures={spec['max_failures']}): "
            f"{type(failure).__name__}: {failure}"
        )
    if result is None or not result.return_value:
        raise WorkloadError(f"training on Ray ended without a result from rank 0 (run {run_name})")
    payload = json.loads(result.return_value)
    if "error" in payload:
        return payload
    outcome = WorkloadResult.model_validate(payload)
    first_start = min((s["time"] for s in pump.starts), default=None)
    facts: dict[str, Any] = {
        "ray_job_id": ray.get_runtime_context().get_job_id(),
        "ray_run_name": run_name,
        "num_workers": spec["num_workers"],
        "use_gpu": spec["use_gpu"],
        "attempts": attempts,
        "ray_init_s": round(init_s, 3),
        # From fit() to the first worker running the workload: worker processes, imports, process group.
        "worker_start_s": round(first_start - fit_started_wall, 3) if first_start else None,
        "fit_s": round(fit_s, 3),
        "tokens_per_s": outcome.metrics.get("tokens_per_s"),
        "workers": pump.stats,
        **summarize(pump.stats),
    }
    return outcome.model_copy(update={"engine": facts}).model_dump(mode="json")


def _trainer(spec: dict[str, Any], workload: Workload, sink: Any, run_name: str, storage: str, filesystem: Any) -> Any:
    """Ray Train's TorchTrainer for the workload: its workers, their resources, failures to recover from, checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = spec.get("resources_per_worker") or None
    gpus_per_worker = (resources or {}).get("GPU", 1 if spec["use_gpu"] else 0)
    return TorchTrainer(
        train_loop,  # type: ignore[arg-type]  # Ray's stubs say a loop returns None; its return value is result.return_value
        train_loop_config={
            "workload": workload.model_dump_json(),
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
