"""One aiplane run per home: a second waits (or, told not to, says who holds the home); a dead holder frees it."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aiplane.core.errors import AiplaneError
from aiplane.core.homelock import HomeBusy, hold_home, holder_of
from test_cli import _deployment, _env

_HOLD = """
import sys, time
from aiplane.core.homelock import hold_home
with hold_home(sys.argv[1], "the test's holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(home: Path, seconds: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(home), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_that_will_not_wait_is_told_which_process_holds_the_home(tmp_path):
    holder = _holder(tmp_path)
    try:
        assert holder_of(tmp_path).startswith(f"pid {holder.pid} (the test's holder), since ")
        with pytest.raises(HomeBusy, match=rf"in use by pid {holder.pid} \(the test's holder\).*one aiplane run per home"):
            with hold_home(tmp_path, "second", wait=False):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_waiter_says_who_it_waits_for_and_goes_on_when_the_holder_is_killed(tmp_path):
    holder = _holder(tmp_path)
    said: list[str] = []
    entered = threading.Event()

    def wait() -> None:
        with hold_home(tmp_path, "waiter", on_wait=said.append):
            entered.set()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(1)
    assert not entered.is_set(), "the waiter must not enter while the holder holds the home"
    assert said and f"pid {holder.pid}" in said[0] and "waiting for it to finish" in said[0]
    holder.send_signal(signal.SIGKILL)  # a crash: the kernel lets the lock go with the process
    holder.wait()
    assert entered.wait(30), "the home stayed locked after its holder died"
    waiter.join(5)
    assert holder_of(tmp_path) is None, "a released home names no holder"


def test_the_home_is_re_entrant_in_the_process_that_holds_it(tmp_path):
    with hold_home(tmp_path, "outer"):
        with hold_home(tmp_path, "inner (a Dagster run of the same aiplane up)", wait=False):
            assert holder_of(tmp_path).startswith(f"pid {os.getpid()} (outer)")
        assert holder_of(tmp_path) is not None, "leaving the inner block keeps the outer one's hold"
    assert holder_of(tmp_path) is None


def test_a_home_that_cannot_be_created_is_named_with_what_to_do(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(AiplaneError, match=r"Cannot use .*a-file/home as the aiplane home .*set AIPLANE_HOME"):
        with hold_home(tmp_path / "a-file" / "home", "up"):
            pass


def _up(home: Path, *args: str) -> subprocess.Popen:
    """``aiplane up`` as from a terminal: Ctrl-C's SIGINT at its default, even when these tests run as a
    background job, which starts with SIGINT ignored (and Python then installs no KeyboardInterrupt)."""
    cmd = [sys.executable, "-m", "aiplane.assets.cli", "--deployment", str(home / "deployment.yaml"), "up", *args]
    return subprocess.Popen(cmd, env=_env(home), cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def test_up_told_not_to_wait_names_the_holder_and_changes_nothing(tmp_path):
    _deployment(tmp_path)
    holder = _holder(tmp_path)
    try:
        out, err = _up(tmp_path, "--no-wait").communicate(timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert f"in use by pid {holder.pid} (the test's holder)" in err and "Traceback" not in err, err[-2000:]
    assert err.rstrip().splitlines()[-1].startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "deployment.yaml", "tmp"], "nothing was started or written"


def test_ctrl_c_while_up_waits_for_the_home_says_cancelled_and_exits_130(tmp_path):
    _deployment(tmp_path)
    holder = _holder(tmp_path)
    proc = _up(tmp_path)
    try:
        line = proc.stderr.readline()
        assert f"in use by pid {holder.pid}" in line and "waiting for it to finish" in line, line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        holder.kill()
        holder.wait()
    assert proc.returncode == 130, err[-2000:]
    assert err.rstrip().splitlines()[-1].startswith("aiplane: cancelled (Ctrl-C)") and "Traceback" not in err
