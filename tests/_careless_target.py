"""A deliberately careless third-party serving target (tests/test_cleanup.py): its deploy starts a server in a
session of its own, then fails without stopping it. Its ``cleanup()``, which the contract asks for, is all that
stands between that server and a machine full of orphans; aiplane must call it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from aiplane.core.components import FactsheetPublisher, ServingTarget
from aiplane.core.errors import WorkloadError
from aiplane.core.hookspecs import hookimpl
from aiplane.core.processes import process_gone, process_token
from aiplane.core.records import EndpointRecord, FactsheetRecord
from aiplane.core.workload import Workload, WorkloadContext


class CarelessSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: str
    """Where a deploy notes the servers it starts."""


class CarelessTarget(ServingTarget[CarelessSettings]):
    name = "careless"
    Settings = CarelessSettings

    def workload(self, adapter, endpoint_name: str) -> Workload:
        return Workload(name="deploy-endpoint", entrypoint="_careless_target:deploy", inputs={"adapter": adapter},
                        params={"endpoint": endpoint_name, "directory": self.settings.directory})  # fmt: skip

    def stop(self, endpoint: EndpointRecord) -> bool:
        return False  # no deploy of it ever succeeds

    def cleanup(self, endpoint_name: str) -> None:
        noted = Path(self.settings.directory) / f"{endpoint_name}.servers"
        for line in noted.read_text().splitlines() if noted.exists() else ():
            server = json.loads(line)
            if not process_gone(server["pid"], server["token"]):
                os.killpg(server["pid"], signal.SIGKILL)
        noted.unlink(missing_ok=True)


def deploy(ctx: WorkloadContext) -> dict[str, EndpointRecord]:
    """Start a 'server' that leaves the engine's process group, note it, then fail, leaving it running."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    folder = Path(ctx.params["directory"])
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{ctx.params['endpoint']}.servers", "a") as noted:
        noted.write(json.dumps({"pid": proc.pid, "token": process_token(proc.pid)}) + "\n")
    (folder / "server.pid").write_text(str(proc.pid))
    time.sleep(1.0)  # waiting for it to answer, which it never does
    raise WorkloadError(f"careless: the server (pid {proc.pid}) never answered")


class ForgetfulTarget(CarelessTarget):
    """As careless, and its cleanup() forgets to stop anything."""

    name = "forgetful"

    def cleanup(self, endpoint_name: str) -> None:
        pass


class CarelessPublisher(FactsheetPublisher[CarelessSettings]):
    """Its publish leaves a half-written folder, then fails; only its ``cleanup()`` removes the folder."""

    name = "careless-publisher"
    Settings = CarelessSettings

    def workload(self, endpoint: EndpointRecord, document) -> Workload:
        return Workload(name="publish-factsheet", entrypoint="_careless_target:publish", inputs={"endpoint": endpoint},
                        params={"directory": self.settings.directory})  # fmt: skip

    def cleanup(self, endpoint: EndpointRecord) -> None:
        shutil.rmtree(Path(self.settings.directory) / f"{endpoint.model_name}.partial", ignore_errors=True)


def publish(ctx: WorkloadContext) -> dict[str, FactsheetRecord]:
    """Write part of a factsheet folder, then fail, leaving it."""
    partial = Path(ctx.params["directory"]) / f"{ctx.inputs['endpoint'].model_name}.partial"
    partial.mkdir(parents=True)
    (partial / "factsheet.json").write_text("{")
    raise WorkloadError(f"careless-publisher: gave up half-way, leaving {partial}")


class Plugin:
    @hookimpl
    def aiplane_serving_targets(self):
        return [CarelessTarget]

    @hookimpl
    def aiplane_factsheet_publishers(self):
        return [CarelessPublisher]
