import os
import threading
import time

import psutil
import pytest

from aiplane.core.config import Target
from aiplane.core.errors import InputError, WorkloadCancelled, WorkloadError
from aiplane.core.plugins import Registry
from aiplane.core.workload import Workload

TARGET = Target(name="local", engine="local", region="eu")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _engine():
    return Registry().engine("local")


def test_workload_runs_in_a_subprocess_and_streams_events_in_order(workload_path):
    events = []
    w = Workload(name="echo", entrypoint="_workloads:echo", params={"name": "x"})
    result = _engine().run(w, TARGET, events.append)
    assert result.metrics["pid"] != os.getpid()
    assert result.engine["pid"] == result.metrics["pid"]
    assert result.outputs["out"].uri == "/tmp/x"
    assert [str(e) for e in events] == [
        "line 0", "progress=0 (step 0)", "line 1", "progress=1 (step 1)", "line 2", "progress=2 (step 2)",
    ]


def test_cancel_stops_the_workload_process(workload_path):
    cancel = threading.Event()
    pids = []

    def on_event(event):
        if event.message.startswith("sleeping in"):
            pids.append(int(event.message.split()[-1]))
            cancel.set()

    w = Workload(name="sleep", entrypoint="_workloads:sleep_forever")
    started = time.monotonic()
    with pytest.raises(WorkloadCancelled):
        _engine().run(w, TARGET, on_event, cancel)
    assert time.monotonic() - started < 30
    assert len(pids) == 1 and _gone(pids[0])


def test_interrupting_the_caller_kills_the_workload(workload_path):
    """Dagster run termination raises inside engine.run; the subprocess must not outlive it."""
    pids = []

    class Interrupted(BaseException):
        pass

    def on_event(event):
        if event.message.startswith("sleeping in"):
            pids.append(int(event.message.split()[-1]))
            raise Interrupted()

    with pytest.raises(Interrupted):
        _engine().run(Workload(name="sleep", entrypoint="_workloads:sleep_forever"), TARGET, on_event)
    assert len(pids) == 1 and _gone(pids[0])


def test_workload_error_is_raised_again_with_its_class_and_message(workload_path):
    with pytest.raises(InputError, match="training set is empty"):
        _engine().run(Workload(name="bad", entrypoint="_workloads:bad_input"), TARGET, lambda e: None)


def test_crashed_workload_reports_exit_code_and_last_output(workload_path):
    with pytest.raises(WorkloadError, match=r"exited with code 3(.|\n)*about to crash"):
        _engine().run(Workload(name="crash", entrypoint="_workloads:crash"), TARGET, lambda e: None)


def test_unknown_entrypoint_module_says_what_to_install(workload_path):
    with pytest.raises(WorkloadError, match="Install the plugin"):
        _engine().run(Workload(name="x", entrypoint="no_such_module:run"), TARGET, lambda e: None)


def test_non_utf8_output_is_replaced_not_fatal(workload_path):
    events = []
    _engine().run(Workload(name="noisy", entrypoint="_workloads:noisy_bytes"), TARGET, events.append)
    messages = [e.message for e in events]
    assert "still talking" in messages
    assert any(m.startswith("latin-1 ") and "\ufffd" in m for m in messages)


def test_a_child_left_behind_neither_blocks_the_engine_nor_outlives_it(workload_path):
    events = []
    started = time.monotonic()
    _engine().run(Workload(name="child", entrypoint="_workloads:leaves_a_child"), TARGET, events.append)
    assert time.monotonic() - started < 20
    child = int(next(e.message for e in events if e.message.startswith("child ")).split()[1])
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child)


def test_a_bug_in_a_workload_keeps_its_type_and_traceback(workload_path):
    events = []
    with pytest.raises(WorkloadError, match="failed: KeyError: 'input_ids'"):
        _engine().run(Workload(name="buggy", entrypoint="_workloads:buggy"), TARGET, events.append)
    assert any("Traceback (most recent call last)" in e.message for e in events)
    assert any('return {}["input_ids"]' in e.message for e in events)
