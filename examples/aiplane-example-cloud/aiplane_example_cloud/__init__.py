"""An example third-party engine plugin for aiplane.

A real cloud plugin would submit the workload to that cloud's job API here.
This one runs it in a worker thread of the calling process, which is enough to
show the contract: aiplane finds the engine through the ``aiplane`` entry
point, validates its settings from the deployment file and lets placement
choose it, with no change to aiplane itself.
"""

import threading

from pydantic import BaseModel, ConfigDict

from aiplane.core import Engine, WorkloadCancelled, hookimpl
from aiplane.core.workload import execute

__all__ = ["ExampleCloudEngine", "aiplane_engines"]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    project: str = "default"
    """The cloud project workloads are billed to."""


class ExampleCloudEngine(Engine[_Settings]):
    name = "example-cloud"
    Settings = _Settings

    def run(self, workload, target, on_event, cancel=None):
        cancel = cancel or threading.Event()
        box = {}

        def work():
            try:
                box["result"] = execute(workload, on_event, cancel)
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        worker = threading.Thread(target=work, name=f"example-cloud-{workload.run_id}", daemon=True)
        worker.start()
        worker.join()
        if "error" in box:
            raise box["error"]
        if cancel.is_set():
            raise WorkloadCancelled(f"workload {workload.run_id} was cancelled")
        return box["result"].model_copy(
            update={"engine": {"engine": self.name, "target": target.name, "project": self.settings.project}}
        )


@hookimpl
def aiplane_engines():
    return [ExampleCloudEngine]
