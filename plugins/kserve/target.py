"""The ``kserve-local`` serving target: a KServe model server process on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from aiplane.core.components import ServingTarget
from aiplane.core.errors import InputError
from aiplane.core.workload import Workload

from ._process import CURRENT, check_endpoint_name, locked, read_current, remove_quietly, terminate

if TYPE_CHECKING:
    from aiplane.core.records import AdapterRecord, EndpointRecord

__all__ = ["KServeLocal"]


class KServeLocal(ServingTarget):
    """Serves the adapter with a KServe ``ModelServer`` started as a detached process on this machine.

    Re-deploying an endpoint is blue/green: the new server must answer a real
    completion before it becomes current and the old one is stopped.
    """

    name = "kserve-local"
    engines = ("local",)

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        host: str = "127.0.0.1"
        """Address the server listens on; the default keeps it off the network."""
        port: int = Field(0, ge=0, le=65535)
        """0 picks a free port. A fixed port cannot be blue/green re-deployed while the old server holds it."""
        readiness_timeout_s: float = Field(120.0, gt=0)
        """How long a new server may take to load and answer its first completion."""
        max_new_tokens: int = Field(16, ge=1)
        """Generation length for v2 infer requests that do not say ``max_tokens``."""

    def workload(self, adapter: "AdapterRecord", endpoint_name: str, home: str) -> Workload:
        """The ``deploy-endpoint`` workload; its result's ``endpoint`` output is the new EndpointRecord."""
        check_endpoint_name(endpoint_name)
        try:
            adapter.source("base_model")
        except LookupError:
            raise InputError(
                f"Adapter {adapter.uri!r} records no base_model source, so there is nothing to apply it to; "
                "re-train it so its record carries the base model."
            ) from None
        return Workload(
            name="deploy-endpoint",
            entrypoint="aiplane.plugins.kserve.deploy:run",
            inputs={"adapter": adapter},
            params={
                "endpoint_name": endpoint_name,
                "home": str(Path(home).expanduser().absolute()),
                "settings": self.settings.model_dump(),
            },
        )

    def stop(self, endpoint: "EndpointRecord") -> None:
        """Stop the server behind ``endpoint``; a stopped one is not an error.

        Clears ``current.json`` when it names this server, so a later deploy
        starts fresh rather than trying to replace it.
        """
        pid, state_dir = endpoint.handle.get("pid"), endpoint.handle.get("state_dir")
        if endpoint.serving != self.name or not isinstance(pid, int) or not state_dir:
            raise InputError(
                f"Endpoint {endpoint.uri!r} was served by {endpoint.serving!r}, not deployed by {self.name!r} "
                "(its handle has no pid and state_dir); stop it with the serving target that deployed it."
            )
        state = Path(state_dir)
        if not state.is_dir():
            terminate(pid, endpoint.model_name)
            return
        with locked(state):
            terminate(pid, endpoint.model_name)
            current = read_current(state)
            if current is not None and current["pid"] == pid:
                remove_quietly(state / CURRENT)
