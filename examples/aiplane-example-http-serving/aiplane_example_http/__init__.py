"""An example third-party serving target: an OpenAI-completions endpoint served by a stdlib HTTP server.

``workload()`` describes the deploy; :func:`deploy` runs wherever the engine puts it and starts (or reuses)
the endpoint's server, as a process tree aiplane owns (:func:`aiplane.core.processes.start_tree`);
``running()`` and ``stop()`` run in the orchestrator with the record's ``handle`` (the tree's handle and the
state file: nothing secret, since it is shown in the UI); ``cleanup()`` runs there too after a deploy failed
or was cancelled, and stops a server the deploy started but never recorded as the endpoint's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from aiplane.core import EndpointRecord, ServingTarget, Workload, WorkloadError, hookimpl
from aiplane.core.records import OPENAI_COMPLETIONS
from aiplane.core.processes import process_gone, start_tree, stop_tree

__all__ = ["HttpServingTarget", "deploy", "aiplane_serving_targets"]

PROTOCOLS = (OPENAI_COMPLETIONS,)


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: str
    """Where each endpoint's state (port, pid, the adapter it serves) is kept."""
    start_timeout_s: float = 30.0


class HttpServingTarget(ServingTarget[_Settings]):
    name = "example-http"
    Settings = _Settings

    def locations(self) -> dict[str, str]:
        return {"directory": self.settings.directory}

    def workload(self, adapter, endpoint_name: str) -> Workload:
        return Workload(
            name="serve-endpoint",
            entrypoint="aiplane_example_http:deploy",
            inputs={"adapter": adapter},
            params={"endpoint": endpoint_name, **self.settings.model_dump()},
        )

    def running(self, endpoint: EndpointRecord) -> bool | None:
        handle = endpoint.handle
        return not process_gone(handle["pid"], handle["token"])

    def stop(self, endpoint: EndpointRecord) -> bool:
        handle = endpoint.handle
        stopped = stop_tree(handle)
        if stopped:
            Path(str(handle["state"])).unlink(missing_ok=True)
        return stopped

    def cleanup(self, endpoint_name: str) -> None:
        # A deploy notes the server it starts before it can be cancelled; a finished one drops the note.
        starting = Path(self.settings.directory).expanduser() / f"{endpoint_name}.starting"
        if starting.exists():
            stop_tree(json.loads(starting.read_text()))
            starting.unlink(missing_ok=True)


def deploy(ctx) -> dict[str, EndpointRecord]:
    adapter, name = ctx.inputs["adapter"], ctx.params["endpoint"]
    folder = Path(ctx.params["directory"]).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    state, serves = folder / f"{name}.json", folder / f"{name}.adapter"
    _write(serves, adapter.digest)  # a running server answers with the new adapter from its next request on
    known = json.loads(state.read_text()) if state.exists() else None
    starting = state.with_suffix(".starting")  # notes a server this deploy started, for cleanup() to stop
    if known is None or process_gone(known["pid"], known["token"]):
        known = _start(ctx, name, starting, serves, float(ctx.params["start_timeout_s"]))
    url = f"http://127.0.0.1:{known['port']}"
    digest = hashlib.sha256(f"{adapter.digest} {name} {url}".encode()).hexdigest()
    endpoint = EndpointRecord(
        uri=url, digest=f"sha256:{digest}", url=url, model_name=name, protocols=PROTOCOLS,
        serving=HttpServingTarget.name, handle={**known, "state": str(state)}, sources=(adapter,),
    )  # fmt: skip
    # Last, then return at once: a cancel that comes later is too late to stop the deploy (the worker then
    # delivers the result, and the endpoint names the server); one that comes earlier leaves the note.
    _write(state, json.dumps(known))
    starting.unlink(missing_ok=True)
    return {"endpoint": endpoint}


def _start(ctx, name: str, starting: Path, serves: Path, timeout_s: float) -> dict:
    port_file = starting.with_suffix(".port")
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "aiplane_example_http.server", name, str(serves), str(port_file)]
    # Its own session (the engine ends the workload's process group when the workload returns), and noted
    # before a cancel can interrupt this deploy: start_tree holds the signal until the note is written.
    with open(os.devnull, "wb") as devnull:
        proc, handle = start_tree(cmd, os.environ, output=devnull, record=lambda h: _write(starting, json.dumps(h)))
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise WorkloadError(f"example-http: the server for {name!r} did not start within {timeout_s:g} s")
        time.sleep(0.05)
    known = {**handle, "port": int(port_file.read_text())}
    ctx.log(f"example-http: serving {name!r} on port {known['port']} (pid {proc.pid})")
    return known


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@hookimpl
def aiplane_serving_targets():
    return [HttpServingTarget]
