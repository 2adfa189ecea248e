"""``aiplane.core.processes``: following a workload's process and stopping its whole group."""

from __future__ import annotations

import subprocess
import sys
import time

from aiplane.core.processes import GRACE_S, follow_process, kill_group, start_process

# Says its answer, then ignores SIGTERM and would go on for a minute, as a driver stopping its Ray does.
_ANSWERS_THEN_LINGERS = (
    "import signal, sys, time\n"
    "print('working', flush=True)\n"
    "print('answer', flush=True)\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "time.sleep(60)\n"
    "print('too late', flush=True)\n"
)


def test_a_process_that_has_answered_is_killed_with_its_group_not_waited_for():
    proc = start_process([sys.executable, "-c", _ANSWERS_THEN_LINGERS])
    lines: list[str] = []
    started = time.monotonic()
    follow_process(proc, lines.append, done=lambda: "answer" in lines)
    # Killed outright: neither its minute nor the SIGTERM grace it would have ignored.
    assert time.monotonic() - started < GRACE_S
    assert lines == ["working", "answer"] and proc.returncode is not None


def test_stopping_a_group_does_not_wait_for_zombies_whose_parent_has_yet_to_reap_them():
    # A group of its own in this session, so that a child of this process can join it.
    leader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], process_group=0)
    # A member of the leader's group that exits at once and that nobody reaps until the end of this test:
    # its parent is this process, as init is for the members a killed leader leaves behind.
    zombie = subprocess.Popen(["true"], process_group=leader.pid)
    try:
        deadline = time.monotonic() + 10
        while _state(zombie.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _state(zombie.pid) == "Z"
        started = time.monotonic()
        kill_group(leader)
        assert time.monotonic() - started < GRACE_S and leader.returncode is not None
        assert _state(zombie.pid) == "Z", "the zombie was still there, unreaped, when the group counted as stopped"
    finally:
        zombie.wait()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()
