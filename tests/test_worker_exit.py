"""The worker leaves without the interpreter's teardown, but does what an ordinary exit does first."""

from pathlib import Path

from aiplane.core.config import Target
from aiplane.core.plugins import Registry
from aiplane.core.workload import Workload

TARGET = Target(name="local", engine="local", region="eu")


def test_atexit_hooks_threads_and_finalizers_still_run(workload_path, tmp_path):
    w = Workload(name="exit", entrypoint="_worker_workloads:leaves_work_for_exit", params={"dir": str(tmp_path)})
    result = Registry().engine("local").run(w, TARGET, lambda event: None)
    assert result.outputs == {}
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "ran"  # a non-daemon thread was waited for
    assert not Path((tmp_path / "tmpdir").read_text()).exists()  # a TemporaryDirectory's finalizer ran



def test_a_cancel_that_comes_once_the_entry_point_returned_still_delivers_its_result(workload_path):
    # What the entry point did (a deploy's server started and recorded) is done: losing its result to a late
    # cancel would leave that work running with no record of it.
    w = Workload(name="late-cancel", entrypoint="_worker_workloads:cancelled_once_it_returned")
    result = Registry().engine("local").run(w, TARGET, lambda event: None)
    assert result.metrics["late"] == "delivered" and result.outputs["out"].publisher == "test"
