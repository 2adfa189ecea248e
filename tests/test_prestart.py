"""Prestarted workers (local engine) and a prestarted private Ray (ray engine): started ahead of a workload,
handed exactly one, isolated as usual, and gone with their starter when not used."""

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from aiplane.core.config import Target
from aiplane.core.errors import WorkloadCancelled
from aiplane.core.plugins import Registry
from aiplane.core.workload import Workload
from aiplane.plugins.local import engine as local_engine

TARGET = Target(name="local", engine="local", region="eu")
WHERE = "_worker_workloads:where_am_i"
# Modules nothing else in the worker imports, so finding them imported means the standby preloaded them.
PRELOAD = ["colorsys", "wave"]


@pytest.fixture(autouse=True)
def no_standbys_left():
    yield
    local_engine._discard_standbys()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _standby_pid(entrypoint: str) -> int:
    ((python, entry), standby), = [(k, v) for k, v in local_engine._STANDBYS.items() if k[1] == entrypoint]
    return standby.proc.pid


def _where(engine, events=None):
    w = Workload(name="where", entrypoint=WHERE, params={"modules": PRELOAD})
    return engine.run(w, TARGET, (events.append if events is not None else lambda e: None))


def test_the_next_run_of_the_entry_point_is_handed_to_the_prestarted_worker(workload_path):
    engine = Registry().engine("local")
    assert engine.prestart(WHERE, preload=PRELOAD, wait_s=60)
    standby = _standby_pid(WHERE)
    events = []
    result = _where(engine, events)
    assert result.metrics["pid"] == standby == result.engine["pid"] != os.getpid()
    assert result.metrics["preloaded"] == PRELOAD
    assert result.metrics["stdin"] == ""  # as a worker started for it: nothing to read
    assert result.engine["prestarted"] is True
    assert f"running in {standby}" in [e.message for e in events]
    assert _gone(standby)
    # Used once: the next run gets a worker of its own, which imported nothing ahead.
    again = _where(engine)
    assert again.metrics["pid"] != standby
    assert again.metrics["preloaded"] == []
    assert "prestarted" not in again.engine


def test_a_second_prestart_keeps_the_waiting_worker(workload_path):
    engine = Registry().engine("local")
    engine.prestart(WHERE, preload=PRELOAD)
    first = _standby_pid(WHERE)
    engine.prestart(WHERE, preload=PRELOAD)
    assert _standby_pid(WHERE) == first


def test_other_entry_points_do_not_take_it(workload_path):
    engine = Registry().engine("local")
    engine.prestart(WHERE, preload=PRELOAD, wait_s=60)
    standby = _standby_pid(WHERE)
    echo = engine.run(Workload(name="echo", entrypoint="_workloads:echo", params={"name": "x"}), TARGET, lambda e: None)
    assert echo.metrics["pid"] != standby and "prestarted" not in echo.engine
    assert _where(engine).metrics["pid"] == standby


def test_a_changed_environment_retires_the_standby(workload_path, monkeypatch):
    engine = Registry().engine("local")
    engine.prestart(WHERE, preload=PRELOAD, wait_s=60)
    standby = _standby_pid(WHERE)
    monkeypatch.setenv("AIPLANE_TEST_PRESTART", "changed")
    events = []
    result = _where(engine, events)
    assert result.metrics["pid"] != standby and "prestarted" not in result.engine
    assert _gone(standby)
    # Said in the run log, by variable name only (values may be secrets).
    (note,) = [e.message for e in events if "prestarted worker" in e.message]
    assert "environment changed" in note and "AIPLANE_TEST_PRESTART" in note and "changed)" not in note


def test_a_cache_variable_torch_sets_in_the_orchestrator_on_import_does_not_retire_the_standby(workload_path, monkeypatch):
    # Importing transformers in the orchestrator sets TORCHINDUCTOR_CACHE_DIR to the default the worker computes too.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    engine = Registry().engine("local")
    engine.prestart(WHERE, preload=PRELOAD, wait_s=60)
    standby = _standby_pid(WHERE)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_someone")
    assert _where(engine).metrics["pid"] == standby


def test_engines_that_cannot_prepare_ahead_say_so():
    from aiplane.core.components import Engine

    class Plain(Engine):
        name = "plain"

        def run(self, workload, target, on_event, cancel=None):
            raise NotImplementedError("never run here")

    assert Plain().prestart("x:y", preload=["torch"], wait_s=1) is False


def test_a_standby_that_died_is_replaced_by_a_fresh_worker(workload_path):
    engine = Registry().engine("local")
    engine.prestart(WHERE, preload=PRELOAD, wait_s=60)
    standby = _standby_pid(WHERE)
    os.killpg(standby, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while local_engine._STANDBYS[(sys.executable, WHERE)].proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    result = _where(engine)
    assert result.metrics["pid"] != standby and "prestarted" not in result.engine


def test_cancelling_kills_a_prestarted_worker(workload_path):
    engine = Registry().engine("local")
    engine.prestart("_workloads:sleep_forever", wait_s=60)
    standby = _standby_pid("_workloads:sleep_forever")
    cancel = threading.Event()

    def on_event(event):
        if event.message.startswith("sleeping in"):
            cancel.set()

    with pytest.raises(WorkloadCancelled):
        engine.run(Workload(name="sleep", entrypoint="_workloads:sleep_forever"), TARGET, on_event, cancel)
    assert _gone(standby)


def test_an_unused_standby_ends_with_the_process_that_started_it(workload_path):
    code = (
        "import os\n"
        "from aiplane.core.plugins import Registry\n"
        "from aiplane.plugins.local import engine\n"
        f"Registry().engine('local').prestart({WHERE!r}, wait_s=60)\n"
        "(standby,) = engine._STANDBYS.values()\n"
        "print(standby.proc.pid, flush=True)\n"
        "os._exit(0)  # as if killed: no atexit clean-up\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    standby = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30
    while not _gone(standby) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(standby)


# -- the ray engine: a private Ray started ahead of the run ------------------------------------------


def _ray_processes(directory: str) -> list[int]:
    """Processes of the private Ray under ``directory``: each names its session directory on its command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(directory in arg for arg in proc.info["cmdline"] or ()):
            found.append(proc.pid)
    return found


def test_an_unused_prestarted_ray_ends_with_the_process_that_started_it_even_when_killed():
    code = (
        "import os\n"
        "from aiplane.core.plugins import Registry\n"
        "from aiplane.plugins.ray import engine\n"
        "assert Registry().engine('ray', {'address': 'local', 'num_workers': 1}).prestart('x:y', wait_s=600)\n"
        "(standby,) = engine._STANDBYS.values()\n"
        "print(standby.proc.pid, standby.head.tmp, len(os.listdir(standby.head.tmp / 'ray')), flush=True)\n"
        "os._exit(0)  # as if killed: no atexit clean-up\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=660, check=True)
    driver, directory, entries = out.stdout.split()
    assert int(entries) > 0, "the prestarted Ray was up (its session directory written) when its starter died"
    deadline = time.monotonic() + 60
    while (not _gone(int(driver)) or _ray_processes(directory) or os.path.exists(directory)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(int(driver)) and _ray_processes(directory) == []
    assert not os.path.exists(directory)


def test_a_prestarted_ray_is_not_used_once_the_environment_changed_and_is_stopped(monkeypatch):
    from aiplane.plugins.ray import engine as ray_engine

    engine = Registry().engine("ray", {"address": "local", "num_workers": 1})
    try:
        engine.prestart("x:y")  # no wait: what is checked is the hand-over, not Ray
        (standby,) = ray_engine._STANDBYS.values()
        monkeypatch.setenv("AIPLANE_TEST_CHANGED", "1")
        taken, why = ray_engine._take_standby(engine._standby_key(), ray_engine._inherited(), os.getcwd())
        assert taken is None and "AIPLANE_TEST_CHANGED" in why
        assert _gone(standby.proc.pid) and not standby.head.tmp.exists()
    finally:
        ray_engine._discard_standbys()


def test_a_ray_cluster_target_prestarts_nothing():
    from aiplane.plugins.ray import engine as ray_engine

    engine = Registry().engine("ray", {"address": "http://127.0.0.1:1"})
    assert engine.prestart("x:y", wait_s=1) is False and ray_engine._STANDBYS == {}


def test_a_prestarted_ray_handed_a_line_that_is_no_workload_lets_its_waiting_workers_go_and_ends():
    from aiplane.core.engines import hand_over
    from aiplane.plugins.ray import engine as ray_engine

    engine = Registry().engine("ray", {"address": "local", "num_workers": 1})
    standby = None
    try:
        assert engine.prestart("x:y", wait_s=600), "the standby's worker waits for its workload"
        standby, _ = ray_engine._take_standby(engine._standby_key(), ray_engine._inherited(), os.getcwd())
        assert standby is not None
        directory = str(standby.head.tmp)
        assert hand_over(standby, "not a spec")
        # Nothing to run: the worker returns, the fit ends, and the driver stops its Ray and exits by itself.
        assert standby.proc.wait(timeout=120) == 0
        deadline = time.monotonic() + 60
        while (_ray_processes(directory) or os.path.exists(directory)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _ray_processes(directory) == [] and not os.path.exists(directory)
    finally:
        if standby is not None:
            standby.discard()
        ray_engine._discard_standbys()
