"""The engine contract: run to completion with every event forwarded, fail as aiplane errors, cancel completely."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiplane.core.components import Engine
from aiplane.core.errors import AiplaneError, WorkloadCancelled
from aiplane.core.workload import Event, Workload

from ._common import Broken, check_check, check_settings
from .fixtures import conformance_target, sample_base_model

__all__ = ["check_engine"]

_HERE = "aiplane.testing._workloads"


def check_engine(cls: type[Engine[Any]], settings: Mapping[str, Any] | None, tmp_path: Path, cancel_within_s: float = 30) -> None:
    """Drive engine ``cls`` with ``settings`` through the contract; raise ConformanceError naming the broken promise.

    The workloads it runs import only ``aiplane.core`` and ``aiplane.testing``: wherever the engine runs
    them, both must be installed.
    """
    engine = check_settings(cls, Engine, "engine", settings)
    broken = Broken("engine", cls.name)
    target = conformance_target(cls.name)
    record = sample_base_model(tmp_path)
    check_check(engine, broken, tmp_path, "engine", settings)
    echo = Workload(name="conformance-echo", entrypoint=f"{_HERE}:echo", inputs={"record": record}, params={"line": "hello"})
    events: list[Event] = []
    result = engine.run(echo, target, events.append)
    broken.require(result.outputs.get("record") == record, f"run() did not return the workload's outputs: {result.outputs!r:.200}")
    broken.require(result.metrics.get("final") == 1, "run() lost the workload's final metrics (ctx.metrics)")
    broken.require(any(e.type == "log" and e.message == "hello" for e in events), "run() did not forward the workload's log line")
    broken.require(any(e.type == "metric" and e.name == "conformance" for e in events), "run() did not forward the workload's metric")

    failing = Workload(name="conformance-fail", entrypoint=f"{_HERE}:fail", params={"message": "on purpose 7f3a"})
    try:
        engine.run(failing, target, lambda event: None)
    except AiplaneError as exc:
        broken.require("on purpose 7f3a" in str(exc), f"a failed workload's error lost its message: {exc}")
    except Exception as exc:  # noqa: BLE001 - the promise is about which errors escape
        raise broken(f"a failed workload raised {type(exc).__name__}, not an aiplane error: {exc}") from None
    else:
        raise broken("run() of a workload that raised returned instead of raising")
    _check_cancel(engine, target, tmp_path, broken, cancel_within_s)


def _check_cancel(engine: Engine, target: Any, tmp_path: Path, broken: Broken, within_s: float) -> None:
    beat = tmp_path / "conformance-heartbeat"
    beat.unlink(missing_ok=True)
    work = Workload(name="conformance-heartbeat", entrypoint=f"{_HERE}:heartbeat", params={"file": str(beat), "seconds": within_s * 4})
    cancel, outcome = threading.Event(), dict[str, Any]()

    def run() -> None:
        try:
            outcome["result"] = engine.run(work, target, lambda event: None, cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the checking thread
            outcome["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    deadline = time.monotonic() + within_s * 4
    while not beat.exists() and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.05)
    broken.require(beat.exists(), f"the workload never started: {outcome.get('error')!r}")
    cancel.set()
    runner.join(within_s)
    broken.require(not runner.is_alive(), f"run() did not return within {within_s:g} s of cancel being set")
    broken.require(
        isinstance(outcome.get("error"), WorkloadCancelled),
        f"a cancelled run must raise WorkloadCancelled, got {outcome!r:.200}",
    )
    last = beat.read_text()
    time.sleep(0.5)
    broken.require(beat.read_text() == last, "the cancelled workload kept running after run() returned")
