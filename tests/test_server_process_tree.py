"""A process tree aiplane owns (``core.processes.start_tree``): whatever its processes did, its record stops all of
them, after its root was killed too, and never a process that merely got one of its pids.

Real processes (``sleep``), no vLLM: the vLLM server's own tree is checked in tests/test_vllm.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from aiplane.core.processes import TREE_ENV, start_tree, stop_tree, tree_processes

# A root that starts one child in its own process group and one in a session of its own (as a library's
# helper may), says their pids, and waits.
_ROOT = (
    "import subprocess, time\n"
    "kept = subprocess.Popen(['sleep', '600'])\n"
    "escaped = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
    "print(kept.pid, escaped.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def tree(tmp_path):
    with open(tmp_path / "out", "w") as out:
        root, handle = start_tree([sys.executable, "-c", _ROOT], {"PATH": os.environ["PATH"]}, output=out)
    deadline = time.monotonic() + 30
    while not (tmp_path / "out").read_text().strip():
        assert time.monotonic() < deadline and root.poll() is None, "the root did not start its children"
        time.sleep(0.05)
    children = [psutil.Process(int(pid)) for pid in (tmp_path / "out").read_text().split()]
    everything = [psutil.Process(root.pid), *children]
    yield root, handle, children
    for proc in everything:  # whatever a failed test left
        if _running(proc):
            proc.kill()
    root.wait(10)


def test_a_tree_whose_root_was_killed_is_stopped_whole_even_a_child_in_a_session_of_its_own(tree):
    root, handle, (kept, escaped) = tree
    assert os.getpgid(escaped.pid) != root.pid, "one child left the root's group and session"
    assert tree_processes(handle) == sorted([root.pid, kept.pid, escaped.pid], key=lambda p: p != root.pid)
    os.kill(root.pid, signal.SIGKILL)
    root.wait(10)
    assert _running(kept) and _running(escaped), "killing the root alone leaves its children running"
    assert sorted(tree_processes(handle)) == sorted([kept.pid, escaped.pid])
    assert stop_tree(handle) is True
    assert not _running(kept) and not _running(escaped)
    assert tree_processes(handle) == [] and stop_tree(handle) is False


def test_a_trees_root_gets_exactly_the_environment_given_and_every_process_the_trees_marker(tree):
    root, handle, children = tree
    assert psutil.Process(root.pid).environ() == {"PATH": os.environ["PATH"], "SPT_NOENV": "1", TREE_ENV: handle["tree"]}
    assert all(child.environ()[TREE_ENV] == handle["tree"] for child in children)


def test_a_pid_reused_by_another_process_is_never_signalled(tree):
    root, handle, _ = tree
    # Another process, in a session of its own, holding the pid a recorded tree's root once had.
    other = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        reused = {"pid": other.pid, "token": handle["token"], "tree": "0" * 32}
        assert tree_processes(reused) == [] and stop_tree(reused) is False
        assert other.poll() is None
        # Its group is another's too, when the record names no tree (one from before trees).
        assert stop_tree({"pid": other.pid, "token": handle["token"]}) is False and other.poll() is None
    finally:
        other.kill()
        other.wait()
    assert _running(psutil.Process(root.pid)), "the tree itself was not touched either"


def test_stopping_an_endpoint_whose_servers_first_process_was_killed_leaves_none_of_its_processes(tree, tmp_path):
    from aiplane.core.records import EndpointRecord
    from aiplane.plugins.vllm import VllmLocal
    from aiplane.plugins.vllm import _server as server

    root, handle, children = tree
    home, scratch = tmp_path / "home", tmp_path / "scratch"
    sdir, edir = server.servers_dir(home) / "0123456789abcdef", server.endpoint_dir(home, "tickets")
    for directory in (sdir, edir, scratch):
        directory.mkdir(parents=True)
    # The records a deploy leaves, for a server whose processes are this tree (``aiplane stop`` reads no more).
    url = "http://127.0.0.1:9"
    server.write_json(sdir / "server.json", {**handle, "host": "127.0.0.1", "port": 9, "url": url, "scratch": str(scratch)})
    state = {"endpoint": "tickets", "server": sdir.name, "server_dir": str(sdir), "url": url, "current": "sha256:1"}
    server.write_json(edir / server.ENDPOINT_STATE, state)
    endpoint = EndpointRecord(
        uri=f"{url}/v1/models/tickets", url=url, digest="sha256:2", model_name="tickets", protocols=(), serving="vllm",
        handle={"server_dir": str(sdir), "state_dir": str(edir), "adapter": "sha256:1"},
    )  # fmt: skip
    os.kill(root.pid, signal.SIGKILL)
    root.wait(10)
    assert VllmLocal().running(endpoint) is False
    VllmLocal().stop(endpoint)
    assert not any(_running(child) for child in children)
    assert not (sdir / "server.json").exists() and not scratch.exists() and not (edir / server.ENDPOINT_STATE).exists()


# A starter that turns SIGTERM into an exception, as the worker does, and is sent one while it records the tree
# it started: the record is written in full, and only then does the exception come.
_STARTER = """
import json, os, signal, sys, time
from aiplane.core.processes import start_tree

class Cancelled(Exception):
    pass

def cancelled(signum, frame):
    raise Cancelled()

signal.signal(signal.SIGTERM, cancelled)
note = sys.argv[1]

def record(handle):
    open(note + ".seen", "w").write(json.dumps(handle))
    if sys.argv[2] == "cancel":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)  # the handler would have run by now, were the signal not held
        open(note, "w").write(json.dumps(handle))
    else:
        raise OSError("No space left on device")

try:
    with open(os.devnull, "wb") as out:
        start_tree(["sleep", "600"], {"PATH": os.environ["PATH"]}, output=out, record=record)
except Cancelled:
    print("cancelled after the record was written" if os.path.exists(note) else "cancelled before it")
except OSError as exc:
    print("record failed:", exc)
else:
    print("not cancelled")
assert signal.getsignal(signal.SIGTERM) is cancelled, "the starter's own handler is put back"
"""


def _starter(tmp_path, how: str) -> tuple[str, dict | None, dict]:
    """What the starter said, the record it wrote (if it did), and the handle its ``record`` was given."""
    note = tmp_path / "tree.json"
    run = subprocess.run([sys.executable, "-c", _STARTER, str(note), how], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    seen = json.loads((tmp_path / "tree.json.seen").read_text())
    return run.stdout.strip(), json.loads(note.read_text()) if note.exists() else None, seen


def test_a_cancel_that_comes_while_a_tree_is_recorded_is_held_until_the_record_is_written(tmp_path):
    said, handle, seen = _starter(tmp_path, "cancel")
    try:
        assert said == "cancelled after the record was written" and handle == seen
        assert len(tree_processes(handle)) == 1, "the record names the running tree, so cleanup can stop it"
    finally:
        stop_tree(seen, 1)


def test_a_tree_whose_record_could_not_be_written_is_killed_and_the_error_raised(tmp_path):
    said, handle, seen = _starter(tmp_path, "fail")
    assert said == "record failed: No space left on device" and handle is None
    assert tree_processes(seen) == [], "nobody could stop a tree nobody wrote down: it is not left running"
