"""Workload working directories: each records its owner, and the ones a killed owner left are swept."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from aiplane.core.config import Target
from aiplane.core.errors import WorkloadCancelled
from aiplane.core.plugins import Registry
from aiplane.core.processes import OWNER_FILE, _start_token, sweep_orphaned_workdirs, workload_dir
from aiplane.core.workload import Workload

TARGET = Target(name="local", engine="local", region="eu")


def _owner(path: Path) -> dict:
    return json.loads((path / OWNER_FILE).read_text())


def _fake_workdir(root: Path, name: str, **owner) -> Path:
    path = root / name
    path.mkdir()
    (path / "workload.json").write_text("{}")
    (path / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), **owner}))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_workload_dir_records_this_process_and_is_removed_after(tmp_path):
    with workload_dir("train", dir=tmp_path) as path:
        assert path.parent == tmp_path and path.name.startswith("aiplane-train-")
        owner = _owner(path)
        assert owner["pid"] == os.getpid()
        assert owner["start"] == _start_token(os.getpid()) and owner["start"]
        assert owner["host"] == socket.gethostname()
    assert not path.exists()


def test_a_live_owners_dir_is_kept(tmp_path):
    with workload_dir("live", dir=tmp_path) as path:
        (path / "workload.json").write_text("{}")
        assert sweep_orphaned_workdirs(tmp_path) == []
        assert (path / "workload.json").is_file()


def test_the_dir_of_a_killed_owner_is_swept(tmp_path):
    code = (
        "import sys, time\n"
        "from aiplane.core.processes import workload_dir\n"
        "with workload_dir('killed', dir=sys.argv[1]) as path:\n"
        "    print(path, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        path = Path(proc.stdout.readline().strip())
        assert path.is_dir()
        assert sweep_orphaned_workdirs(tmp_path) == []  # the owner still runs
    finally:
        proc.kill()  # kill -9: no clean-up runs
        proc.wait()
    assert path.is_dir()
    assert sweep_orphaned_workdirs(tmp_path) == [path]
    assert not path.exists()
    assert sweep_orphaned_workdirs(tmp_path) == []


def test_a_dead_pid_is_swept_and_a_reused_pid_does_not_keep_the_dir(tmp_path):
    dead = _fake_workdir(tmp_path, "aiplane-dead-1", pid=_dead_pid(), start="proc:boot:1")
    # The recorded pid runs (it is this test), but it started at another time than the
    # owner did: the owner is gone and its pid was given to a new process.
    mine = _start_token(os.getpid())
    boot, ticks = mine.rsplit(":", 1)
    reused = _fake_workdir(tmp_path, "aiplane-reused-1", pid=os.getpid(), start=f"{boot}:{int(ticks) - 1}")
    live = _fake_workdir(tmp_path, "aiplane-live-1", pid=os.getpid(), start=mine)
    # Recorded by another means (psutil where /proc was not readable): cannot be compared, so kept.
    unsure = _fake_workdir(tmp_path, "aiplane-unsure-1", pid=os.getpid(), start="psutil:1700000000.25")
    assert sorted(sweep_orphaned_workdirs(tmp_path)) == sorted([dead, reused])
    assert not dead.exists() and not reused.exists()
    assert live.is_dir() and unsure.is_dir()


def test_only_marked_dirs_of_this_user_and_host_are_touched(tmp_path):
    dead = _dead_pid()
    kept = [
        _fake_workdir(tmp_path, "aiplane-elsewhere-1", pid=dead, start="proc:boot:1", host="another-host"),
        _fake_workdir(tmp_path, "someone-else-1", pid=dead, start="proc:boot:1"),
        _fake_workdir(tmp_path, "aiplane-garbled-1", pid="12", start="proc:boot:1"),
    ]
    unmarked = tmp_path / "aiplane-unmarked-1"
    unmarked.mkdir()
    half = tmp_path / "aiplane-half-written-1"
    half.mkdir()
    (half / OWNER_FILE).write_text('{"pid": ')
    a_file = tmp_path / "aiplane-a-file"
    a_file.write_text(json.dumps({"pid": dead}))
    assert sweep_orphaned_workdirs(tmp_path) == []
    assert all(p.exists() for p in [*kept, unmarked, half, a_file])


def test_a_missing_root_sweeps_nothing(tmp_path):
    assert sweep_orphaned_workdirs(tmp_path / "nope") == []


def test_the_local_engine_makes_its_dir_through_workload_dir(workload_path):
    cancel = threading.Event()
    seen: list[Path] = []

    def on_event(event):
        if event.message.startswith("sleeping in"):
            for path in Path(tempfile.gettempdir()).glob("aiplane-ownedsleep-*"):
                if (path / "workload.json").is_file() and _owner(path)["pid"] == os.getpid():
                    seen.append(path)
            cancel.set()

    with pytest.raises(WorkloadCancelled):
        Registry().engine("local").run(
            Workload(name="ownedsleep", entrypoint="_workloads:sleep_forever"), TARGET, on_event, cancel
        )
    assert len(seen) == 1
    assert not seen[0].exists()


def test_the_workdir_of_a_killed_engine_is_swept(workload_path, tmp_path, monkeypatch):
    """``kill -9`` of the process running the local engine leaves its workdir; the sweep removes it."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    code = (
        "from aiplane.core.config import Target\n"
        "from aiplane.core.plugins import Registry\n"
        "from aiplane.core.workload import Workload\n"
        "Registry().engine('local').run(\n"
        "    Workload(name='orphan', entrypoint='_workloads:sleep_forever'),\n"
        "    Target(name='local', engine='local', region='eu'),\n"
        "    lambda event: print(event.message, flush=True),\n"
        ")\n"
    )
    engine = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        deadline = time.monotonic() + 120
        while worker is None and time.monotonic() < deadline:
            line = engine.stdout.readline()
            if not line:
                break
            if line.startswith("sleeping in "):
                worker = int(line.split()[-1])
        assert worker is not None, "the workload never started"
        (workdir,) = tmp_path.glob("aiplane-orphan-*")
        assert _owner(workdir)["pid"] == engine.pid
        engine.kill()
        engine.wait()
        assert workdir.is_dir()
        assert sweep_orphaned_workdirs(tmp_path) == [workdir]
        assert not workdir.exists()
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
        if worker is not None:
            # The worker leads its own session, so killing the engine left it running: end it.
            try:
                os.killpg(worker, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
