"""The ``kserve-local`` serving target: a KServe model server process on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from aiplane.core.components import ServingTarget
from aiplane.core.errors import ConfigError, InputError
from aiplane.core.workload import Workload

from . import _port
from ._process import (
    CURRENT,
    check_endpoint_name,
    is_our_server,
    live_current,
    locked,
    read_current,
    remove_quietly,
    terminate,
)

if TYPE_CHECKING:
    from aiplane.core.config import Deployment
    from aiplane.core.records import AdapterRecord, EndpointRecord

__all__ = ["KServeLocal"]


class KServeLocal(ServingTarget):
    """Serves the adapter with a KServe ``ModelServer`` started as a detached process on this machine.

    An endpoint keeps its URL for its life. Re-deploying it is blue/green behind
    that URL: the new server must answer a real completion before it becomes
    current and takes the endpoint's connections; the old one then finishes the
    requests it has and stops.
    """

    name = "kserve-local"
    engines = ("local",)

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        host: str = "127.0.0.1"
        """Address the server listens on; the default keeps it off the network."""
        port: int = Field(0, ge=0, le=65535)
        """0 picks a free port when the endpoint is first deployed; re-deploys keep the endpoint's port either way."""
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

    def check(self, deployment: "Deployment", endpoint_name: str = "support-tickets") -> list[str]:
        """Problems deploying ``endpoint_name`` would meet: a host that does not resolve, a port someone else holds.

        A fixed ``port`` (or, with ``port: 0``, the port of the endpoint's live
        server) may be held only by the endpoint's current server, found through
        ``deployment.home``. ``endpoint_name`` defaults to the Dagster asset's
        endpoint name. No side effects: nothing is bound, started or written.
        """
        try:
            state_dir = Path(deployment.home) / "serving" / check_endpoint_name(endpoint_name)
        except ConfigError as exc:
            return [str(exc)]
        return _port.problems(
            self.settings.host, self.settings.port, live_current(state_dir, endpoint_name), endpoint_name
        )

    def running(self, endpoint: "EndpointRecord") -> bool | None:
        """Whether the server behind ``endpoint`` is alive and still the endpoint's current one.

        ``False`` for a record a later deploy replaced, even though its URL
        answers; ``None`` for a record this target did not deploy. No side effects.
        """
        try:
            pid, state = self._server(endpoint)
        except InputError:
            return None
        current = read_current(state)
        return current is not None and current["pid"] == pid and is_our_server(pid, endpoint.model_name)

    def stop(self, endpoint: "EndpointRecord") -> bool:
        """Stop the server behind ``endpoint``: True if it was running, False if there was none to stop.

        Clears ``current.json`` when it names this server, so a later deploy
        starts fresh rather than trying to replace it.
        """
        pid, state = self._server(endpoint)
        if not state.is_dir():
            return terminate(pid, endpoint.model_name)
        with locked(state):
            stopped = terminate(pid, endpoint.model_name)
            current = read_current(state)
            if current is not None and current["pid"] == pid:
                remove_quietly(state / CURRENT)
        return stopped

    def _server(self, endpoint: "EndpointRecord") -> tuple[int, Path]:
        """The pid and state directory in ``endpoint``'s handle; InputError if this target did not deploy it."""
        pid, state_dir = endpoint.handle.get("pid"), endpoint.handle.get("state_dir")
        if endpoint.serving != self.name or not isinstance(pid, int) or not state_dir:
            raise InputError(
                f"Endpoint {endpoint.uri!r} was served by {endpoint.serving!r}, not deployed by {self.name!r} "
                "(its handle has no pid and state_dir); stop it with the serving target that deployed it."
            )
        return pid, Path(state_dir)
