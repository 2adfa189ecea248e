"""An example third-party serving target: an OpenAI-completions endpoint served by a stdlib HTTP server.

``workload()`` describes the deploy; :func:`deploy` runs wherever the engine puts it and starts (or reuses)
the endpoint's server; ``running()`` and ``stop()`` run in the orchestrator with the record's ``handle``
(a pid, its start token and the state file: nothing secret, since it is shown in the UI); ``cleanup()``
runs there too after a deploy failed or was cancelled, and stops a server the deploy started but never
recorded as the endpoint's.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from aiplane.core import EndpointRecord, ServingTarget, Workload, WorkloadError, hookimpl
from aiplane.core.records import OPENAI_COMPLETIONS
from aiplane.core.processes import process_gone, process_token

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
        stopped = _kill(int(handle["pid"]), str(handle["token"]))
        if stopped:
            Path(str(handle["state"])).unlink(missing_ok=True)
        return stopped

    def cleanup(self, endpoint_name: str) -> None:
        # A deploy notes the server it starts before waiting for it; a finished one drops the note.
        starting = Path(self.settings.directory).expanduser() / f"{endpoint_name}.starting"
        if starting.exists():
            known = json.loads(starting.read_text())
            _kill(known["pid"], known["token"])
            starting.unlink(missing_ok=True)


def _kill(pid: int, token: str) -> bool:
    """Stop the server ``pid`` (by its start token, so a reused pid is never signalled); whether it ran."""
    if process_gone(pid, token):
        return False
    os.killpg(pid, signal.SIGTERM)  # the server leads its own session: its group is its own
    deadline = time.monotonic() + 10
    while not process_gone(pid, token):
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
        time.sleep(0.05)
    return True


def deploy(ctx) -> dict[str, EndpointRecord]:
    adapter, name = ctx.inputs["adapter"], ctx.params["endpoint"]
    folder = Path(ctx.params["directory"]).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    state, serves = folder / f"{name}.json", folder / f"{name}.adapter"
    _write(serves, adapter.digest)  # a running server answers with the new adapter from its next request on
    known = json.loads(state.read_text()) if state.exists() else None
    if known is None or process_gone(known["pid"], known["token"]):
        known = _start(ctx, name, state, serves, float(ctx.params["start_timeout_s"]))
    url = f"http://127.0.0.1:{known['port']}"
    digest = hashlib.sha256(f"{adapter.digest} {name} {url}".encode()).hexdigest()
    return {
        "endpoint": EndpointRecord(
            uri=url, digest=f"sha256:{digest}", url=url, model_name=name, protocols=PROTOCOLS,
            serving=HttpServingTarget.name, handle={**known, "state": str(state)}, sources=(adapter,),
        )
    }  # fmt: skip


def _start(ctx, name: str, state: Path, serves: Path, timeout_s: float) -> dict:
    port_file = state.with_suffix(".port")
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "aiplane_example_http.server", name, str(serves), str(port_file)]
    # Its own session: the engine ends the workload's process group when the workload returns.
    proc = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    starting = state.with_suffix(".starting")  # for cleanup(), should this deploy be cancelled before it records it
    _write(starting, json.dumps({"pid": proc.pid, "token": process_token(proc.pid)}))
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise WorkloadError(f"example-http: the server for {name!r} did not start within {timeout_s:g} s")
        time.sleep(0.05)
    known = {"pid": proc.pid, "token": process_token(proc.pid), "port": int(port_file.read_text())}
    _write(state, json.dumps(known))
    starting.unlink()
    ctx.log(f"example-http: serving {name!r} on port {known['port']} (pid {proc.pid})")
    return known


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@hookimpl
def aiplane_serving_targets():
    return [HttpServingTarget]
