"""The ``vllm`` serving target: a vLLM server on this machine, one per base model, adapters by endpoint name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from aiplane.core.components import ServingTarget
from aiplane.core.errors import ConfigError, InputError
from aiplane.core.workload import Resources, Workload

from . import _server as server
from .runtime import ServerSettings

if TYPE_CHECKING:
    from aiplane.core.config import Deployment
    from aiplane.core.records import AdapterRecord, EndpointRecord

__all__ = ["VllmLocal"]


class VllmLocal(ServingTarget):
    """Serves adapters from a vLLM server on this machine, the same runtime KServe runs on OpenShift AI.

    Every endpoint of one base model shares one server, which batches requests
    across them. An endpoint is a model name on that server; a new adapter is
    loaded beside the current one, answers a completion, and only then does the
    name route to it: no restart, same URL. The previous ``keep_previous``
    adapters stay loaded, so rolling back is instant.
    """

    name = "vllm"
    engines = ("local",)

    class Settings(ServerSettings):
        host: str = "127.0.0.1"
        """Address the server listens on. The default keeps it off the network: the server takes adapters
        by request (``/v1/load_lora_adapter``), so whoever reaches it can load one from any path it can read."""
        port: int = Field(0, ge=0, le=65535)
        """0 picks a free port when the server first starts; it keeps that port for its life, restarts included."""
        readiness_timeout_s: float = Field(300.0, gt=0)
        """How long a starting server may take to load the model and answer /health."""

    def workload(self, adapter: "AdapterRecord", endpoint_name: str, home: str) -> Workload:
        """The ``deploy-endpoint`` workload; its result's ``endpoint`` output is the new EndpointRecord."""
        from .deploy import base_model_of

        server.check_endpoint_name(endpoint_name)
        base_model_of(adapter)
        return Workload(
            name="deploy-endpoint",
            entrypoint="aiplane.plugins.vllm.deploy:run",
            inputs={"adapter": adapter},
            params={
                "endpoint_name": endpoint_name,
                "home": str(Path(home).expanduser().absolute()),
                "settings": self.settings.model_dump(),
            },
            resources=Resources(cpus=1.0),
        )

    def check(self, deployment: "Deployment", endpoint_name: str = "support-tickets") -> list[str]:
        """A fixed port someone else holds, unless it is this deployment's own server. No side effects."""
        try:
            server.check_endpoint_name(endpoint_name)
        except ConfigError as exc:
            return [str(exc)]
        if self.settings.port == 0 or server.port_free(self.settings.host, self.settings.port):
            return []
        ours = any(
            server.alive(info) and info["port"] == self.settings.port
            for info in map(server.server_info, server.servers_dir(Path(deployment.home)).glob("*"))
        )
        if ours:
            return []
        return [
            f"serving.settings.port {self.settings.port} on {self.settings.host} is held by another process; "
            "stop it, or set port: 0 to pick a free port."
        ]

    def running(self, endpoint: "EndpointRecord") -> bool | None:
        """Whether ``endpoint``'s server is up and healthy and the endpoint still routes to ``endpoint``'s adapter.

        ``False`` for a killed server (``aiplane up`` then deploys again, which
        restarts it on the same port) and for a record a later deploy replaced.
        ``None`` for a record this target did not deploy. No side effects.
        """
        try:
            sdir, edir = self._dirs(endpoint)
        except InputError:
            return None
        info = server.server_info(sdir)
        state = server.read_json(edir / server.ENDPOINT_STATE)
        if state is None or state.get("current") != endpoint.handle.get("adapter"):
            return False
        return server.alive(info) and info["url"] == endpoint.url and server.healthy(info["url"])

    def stop(self, endpoint: "EndpointRecord") -> bool:
        """Stop serving ``endpoint``: unload its adapters; stop the server when no other endpoint uses it.

        True if it was being served, False if there was nothing to stop.
        """
        sdir, edir = self._dirs(endpoint)
        with server.locked(sdir):
            info = server.server_info(sdir)
            state = server.read_json(edir / server.ENDPOINT_STATE)
            if state is None or state.get("server") != sdir.name:
                return False
            running = server.alive(info)
            home = sdir.parents[2]  # <home>/serving/_vllm/<server>
            others = [s for s in server.endpoints_on(home, sdir.name) if s["endpoint"] != state["endpoint"]]
            if running and others:
                for version in state.get("versions", []):
                    server.unload(info["url"], version["lora_name"])
                server.unload(info["url"], state["endpoint"])
            elif not others:
                server.terminate(info)
                server.forget(sdir)
            (edir / server.ENDPOINT_STATE).unlink()
            return running

    def _dirs(self, endpoint: "EndpointRecord") -> tuple[Path, Path]:
        sdir, edir = endpoint.handle.get("server_dir"), endpoint.handle.get("state_dir")
        if endpoint.serving != self.name or not sdir or not edir:
            raise InputError(
                f"Endpoint {endpoint.uri!r} was served by {endpoint.serving!r}, not deployed by {self.name!r} "
                "(its handle names no server); stop it with the serving target that deployed it."
            )
        return Path(sdir), Path(edir)
