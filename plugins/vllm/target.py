"""The ``vllm`` serving target: vLLM servers on this machine, one per merged endpoint, or one per base model
(adapters by endpoint name, ``adapters: lora``), and one per whole model an endpoint serves."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aiplane.core.components import DEFAULT_ENDPOINT, ServingTarget
from aiplane.core.errors import ConfigError, InputError
from aiplane.core.workload import Resources, Workload
from pydantic import Field

from . import _server as server
from .runtime import CPU_ONE_PROCESS, ServerSettings, has_nvidia_gpu

if TYPE_CHECKING:
    from aiplane.core.config import Deployment
    from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord

__all__ = ["VllmLocal"]


class VllmLocal(ServingTarget["VllmLocal.Settings"]):
    """Serves adapters from a vLLM server on this machine, the same runtime KServe runs on OpenShift AI.

    ``adapters: merged`` (the default): each endpoint has a server of its own, serving
    its adapter merged into the base weights, at the base model's speed. A new adapter
    answers a completion on a candidate server first, then its weights are swapped in
    place: no restart, same URL, the prefix cache reset (see :mod:`.deploy`).

    ``adapters: lora``: every endpoint of one base model shares one server, which
    batches requests across them. An endpoint is a model name on that server; a new
    adapter is loaded beside the current one, answers a completion, and only then does
    the name route to it. The previous ``keep_previous`` adapters stay loaded, so
    rolling back is instant.

    A whole model (an ``sft`` model, a full ``distill`` student) is served as its
    own base model, by a server of its own answering to the endpoint's name;
    switching to or from one moves the endpoint to that server's URL, and the
    endpoint's previous server is released (see :mod:`.deploy`).
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
        adapters: Literal["merged", "lora"] = "merged"
        """How an endpoint serves an adapter. ``merged`` (the default): merged into the base model's weights,
        on a server of the endpoint's own, at the base model's speed (vLLM's LoRA path costs 2-4x on CPU);
        a new adapter or a rollback swaps the weights in place, after a candidate server answered with them.
        ``lora``: one server per base model, adapters loaded by request, shared by every endpoint of that base
        and switched instantly; for many adapters on one base."""
        preload_libraries: bool = True
        """Preload tcmalloc and the runtime's Intel OpenMP into the server (on a CPU machine that has them), as
        vLLM's CPU backend asks; false leaves LD_PRELOAD as it is."""
        enforce_eager: bool | None = None
        """vLLM's ``--enforce-eager``: the server runs the model as it is, without compiling it at start.
        Default: eager on a machine without an NVIDIA GPU, where compiling costs about 20 s of every start
        (vLLM's CPU build cannot load its compile cache back) and serves no faster (``bench/serving.py
        --compare``); compiled (and CUDA graphs) with a GPU, where it pays."""

        def eager(self) -> bool:
            """Whether servers start with ``--enforce-eager`` (see :attr:`enforce_eager`)."""
            return self.enforce_eager if self.enforce_eager is not None else not has_nvidia_gpu()

        def flags(self, lora: bool = True) -> dict[str, Any]:
            """:meth:`ServerSettings.flags`, with ``--enforce-eager`` when :meth:`eager`, and on a machine without
            an NVIDIA GPU the model run in the engine's own process (:data:`.runtime.CPU_ONE_PROCESS`)."""
            flags = super().flags(lora)
            extra = list(flags["extra"])
            if self.eager() and "--enforce-eager" not in extra:
                extra.append("--enforce-eager")
            if not has_nvidia_gpu() and not any(a.startswith("--distributed-executor-backend") for a in extra):
                extra.append(CPU_ONE_PROCESS)
            return {**flags, "extra": extra}

    def workload(self, adapter: AdapterRecord, endpoint_name: str) -> Workload:
        """The ``deploy-endpoint`` workload for an adapter or a whole model (``config["full_model"]``); its
        result's ``endpoint`` output is the new EndpointRecord."""
        from .deploy import base_model_of

        server.check_endpoint_name(endpoint_name)
        base_model_of(adapter)
        return Workload(
            name="deploy-endpoint",
            entrypoint="aiplane.plugins.vllm.deploy:run",
            inputs={"adapter": adapter},
            params={
                "endpoint_name": endpoint_name,
                "home": str(self._home()),
                "settings": self.settings.model_dump(),
            },
            resources=Resources(cpus=1.0),
        )

    def _home(self) -> Path:
        if self.home is None:
            raise ConfigError(
                "The vllm serving target keeps its servers' state under the deployment's home; "
                "make it with VllmLocal(settings, home=...) (aiplane does)."
            )
        return self.home

    def cleanup(self, endpoint_name: str) -> None:
        """Stop every vLLM server recorded under :attr:`home` that ``endpoint_name``'s deploy may have started and
        that no endpoint serves from: its own (merged, or a whole model's), and the base models' shared ones.
        Another endpoint's own server is left alone: it may be one prepared for a run still training."""
        servers = server.servers_dir(self._home())
        for sdir in sorted(p for p in servers.glob("*") if p.is_dir()):
            suffix = sdir.name[16:]  # "+<endpoint>" or "-<endpoint>" after the digest's 16 hex digits; "" shared
            if suffix and suffix[1:] != endpoint_name:
                continue
            with server.locked(sdir):  # a deploy starting this server holds the lock until its endpoint names it
                if server.server_info(sdir) is not None and not server.endpoints_on(self._home(), sdir.name):
                    server.forget(sdir)

    def prepare(self, base_model: BaseModelRecord, endpoint_name: str) -> None:
        """Start the server ``endpoint_name`` will be deployed on, on ``base_model``'s weights, in the background
        while the adapter trains; the deploy then finds it ready. Stopped when this process exits if no endpoint
        uses it then (see :mod:`.prepare`). A hint: nothing happens for a base model not on this machine's disk."""
        from .prepare import prepare

        if self.home is not None:
            prepare(self.settings, base_model.uri, base_model.digest, endpoint_name, self.home)

    def max_lora_rank(self) -> int | None:
        """The server's ``--max-lora-rank``: a larger adapter is refused before it is deployed, in either mode
        (a merged endpoint's adapters stay servable if the endpoint is switched to ``adapters: lora``)."""
        return self.settings.max_lora_rank

    def check(self, deployment: Deployment, endpoint_name: str = DEFAULT_ENDPOINT) -> list[str]:
        """A fixed port someone else holds, unless it is this deployment's own server. No side effects."""
        try:
            server.check_endpoint_name(endpoint_name)
        except ConfigError as exc:
            return [str(exc)]
        if self.settings.port == 0 or server.port_free(self.settings.host, self.settings.port):
            return []
        if server.held_by_ours(Path(deployment.home), self.settings.port):
            return []
        return [
            (
                f"serving.settings.port {self.settings.port} on {self.settings.host} is held by another process; "
                "stop it, or set port: 0 to pick a free port."
            )
        ]

    def running(self, endpoint: EndpointRecord) -> bool | None:
        """Whether ``endpoint``'s server is up and healthy and the endpoint still serves ``endpoint``'s adapter
        (or whole model) from it.

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
        if state is None or state.get("current") != endpoint.handle.get("adapter") or state.get("server") != sdir.name:
            return False
        return server.alive(info) and info["url"] == endpoint.url and server.healthy(info["url"])

    def stop(self, endpoint: EndpointRecord) -> bool:
        """Stop serving endpoint ``endpoint.model_name``, from whichever server it is on now: unload its adapters
        from a base model's server other endpoints still use, else stop the server (a whole model's always).

        True if it was being served, False if there was nothing to stop. No process of it is left behind.
        """
        handle_sdir, edir = self._dirs(endpoint)
        with server.locked(edir):
            state = server.read_json(edir / server.ENDPOINT_STATE)
            if state is None or not state.get("server"):
                return False
            sdir = Path(state.get("server_dir") or handle_sdir.parent / state["server"])
            home = edir.parents[1]  # <home>/serving/<endpoint>
            with server.locked(sdir):
                running = server.release(home, sdir, state)
                (edir / server.ENDPOINT_STATE).unlink()
            shutil.rmtree(edir / "merged", ignore_errors=True)  # a merged endpoint's weights: a model's size each
            return running

    def _dirs(self, endpoint: EndpointRecord) -> tuple[Path, Path]:
        sdir, edir = endpoint.handle.get("server_dir"), endpoint.handle.get("state_dir")
        if endpoint.serving != self.name or not sdir or not edir:
            raise InputError(
                f"Endpoint {endpoint.uri!r} was served by {endpoint.serving!r}, not deployed by {self.name!r} "
                "(its handle names no server); stop it with the serving target that deployed it."
            )
        return Path(str(sdir)), Path(str(edir))
