"""The ``deploy-endpoint`` workload of the ``vllm`` target: an adapter becomes what an endpoint name serves.

1. Check everything first: the adapter and base model are usable here, the
   adapter's rank fits the server, the endpoint is not bound to another base
   model. Then provision the vLLM runtime if this machine has none.
2. Under the server's lock: start the base model's server if it is not running
   (on the port it had, so the URL stays), restoring every endpoint it served.
3. Load the adapter under its version name (``tickets@1a2b3c...``) and send it
   one completion. If either fails, nothing routes to it and the endpoint keeps
   serving what it served.
4. The switch: load it in place under the endpoint name. Versions beyond
   ``keep_previous`` earlier ones are unloaded; the rest stay loaded for rollback.

Deploying an adapter the endpoint served before (a rollback) is the same path:
it is still loaded, or is loaded again from its files.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiplane.core.errors import ConfigError, InputError
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord, record_to_json
from aiplane.core.storage import local_path
from aiplane.core.workload import WorkloadContext

from . import _server as server
from .runtime import ensure_vllm

__all__ = ["run", "PROTOCOLS"]

PROTOCOLS = ("openai-completions", "openai-chat-completions")


def run(ctx: WorkloadContext) -> dict[str, EndpointRecord]:
    """Serve ``ctx.inputs["adapter"]`` as endpoint ``ctx.params["endpoint_name"]``; see the module docstring."""
    from .target import VllmLocal

    settings = VllmLocal(ctx.params.get("settings")).settings
    name = server.check_endpoint_name(ctx.params.get("endpoint_name"))
    if not ctx.params.get("home"):
        raise ConfigError("deploy-endpoint needs params.home, the directory holding aiplane's state")
    home = Path(ctx.params["home"]).expanduser().absolute()
    adapter = ctx.inputs.get("adapter")
    if not isinstance(adapter, AdapterRecord):
        raise InputError("deploy-endpoint needs an adapter_weights record as its 'adapter' input")
    base = base_model_of(adapter)
    if adapter.config.get("full_model"):
        raise InputError(
            f"{adapter.method} record {adapter.digest} is a whole model, not an adapter; the vllm target serves "
            "adapters on their base model and does not serve whole models yet. Train with lora (or distill "
            "with student: lora) to serve it."
        )
    adapter_dir = _local_dir(str(ctx.local(adapter.uri)), "Adapter", "adapter_config.json")
    base_dir = _local_dir(str(ctx.local(base.uri, base.digest)), "Base model", "config.json")
    rank = adapter_rank(adapter_dir)
    if rank > settings.max_lora_rank:
        raise ConfigError(
            f"Adapter {adapter.digest} has LoRA rank {rank}, above the vllm target's max_lora_rank "
            f"{settings.max_lora_rank}; raise max_lora_rank (one of 8, 16, 32, 64, ...) or train with a smaller r."
        )
    edir = server.endpoint_dir(home, name)
    state = server.read_json(edir / server.ENDPOINT_STATE)
    if state is not None and state.get("base_model_digest") != base.digest:
        raise InputError(
            f"Endpoint {name!r} serves adapters of base model {state.get('base_model_digest')}, and adapter "
            f"{adapter.digest} was trained on {base.digest}: one endpoint, one base model. Serve it under another "
            "endpoint name, or stop this endpoint (`aiplane stop`) first."
        )

    python = ensure_vllm(ctx.log, ctx.cancel_event)
    sdir = server.server_dir(home, base.digest)
    key = sdir.name
    with server.locked(sdir):
        info = _running_server(ctx, home, sdir, python, base_dir, settings)
        url = info["url"]
        version = server.version_name(name, adapter.digest)
        state = server.read_json(edir / server.ENDPOINT_STATE)  # as of now, under the lock
        versions = [v for v in (state or {}).get("versions", []) if v["digest"] != adapter.digest]
        was_loaded = version in server.loaded(url)
        if not was_loaded:
            server.load(url, version, adapter_dir)
        try:
            server.smoke(url, version)
        except InputError as exc:
            if not was_loaded:
                server.unload(url, version)
            still = f"it keeps serving {state['current']}" if state else "it was not serving before"
            raise InputError(f"Adapter {adapter.digest} was not routed to endpoint {name!r}: {exc}; {still}.") from None
        # The switch: the endpoint name now answers with this adapter's weights. vLLM's prefix cache keys
        # blocks by adapter path too, and ours are content-addressed: no KV of the old weights is reused.
        server.load(url, name, adapter_dir, inplace=True)
        entry = {
            "digest": adapter.digest, "lora_name": version, "path": str(adapter_dir),
            "adapter": record_to_json(adapter), "deployed_at": _now(),
        }  # fmt: skip
        kept, retired = [entry, *versions][: 1 + settings.keep_previous], versions[settings.keep_previous :]
        for old in retired:
            server.unload(url, old["lora_name"])
            ctx.log(f"unloaded {old['lora_name']}: more than keep_previous={settings.keep_previous} newer versions")
        server.write_json(
            edir / server.ENDPOINT_STATE,
            {"endpoint": name, "server": key, "server_dir": str(sdir), "url": url,
             "base_model_digest": base.digest, "current": adapter.digest, "versions": kept},
        )  # fmt: skip
    rolled_back = any(v["digest"] == adapter.digest for v in (state or {}).get("versions", [])[1:])
    ctx.log(
        f"endpoint {name!r} on {url} now serves adapter {adapter.digest}"
        + (" (a rollback to an earlier version)" if rolled_back else "")
        + (f"; still loaded for rollback: {', '.join(v['lora_name'] for v in kept[1:])}" if kept[1:] else "")
    )
    ctx.metrics["server_startup_s"] = info.get("startup_s", 0.0) if info.get("started_here") else 0.0
    return {
        "endpoint": EndpointRecord(
            uri=f"{url}/v1/models/{name}",
            url=url,
            digest=endpoint_digest(adapter, base, name, url),
            model_name=name,
            protocols=PROTOCOLS,
            serving="vllm",
            handle={
                "server": key, "server_dir": str(sdir), "state_dir": str(edir), "pid": info["pid"],
                "adapter": adapter.digest, "version": version, "log": info["log"], "rolled_back": rolled_back,
            },  # fmt: skip
            sources=(adapter,),
        )
    }


def _running_server(ctx, home: Path, sdir: Path, python: Path, base_dir: Path, settings) -> dict[str, Any]:
    """The base model's live server, started (and its endpoints restored) if it is not running; the lock is held."""
    info = server.server_info(sdir)
    flags = settings.flags()
    if server.alive(info) and server.healthy(info["url"]):
        if info.get("flags") == flags and info["host"] == settings.host:
            return info
        # New flags need a new process; the endpoints are loaded back right after, on the same port.
        ctx.log(f"restarting the vLLM server on {info['url']}: its settings changed ({info.get('flags')} -> {flags})")
        server.terminate(info)
    elif server.alive(info):
        ctx.log(f"the vLLM server pid {info['pid']} on {info['url']} does not answer /health; restarting it")
        server.terminate(info)
    elif info is not None:
        ctx.log(f"the vLLM server on {info['url']} (pid {info['pid']}) is gone; starting it again on the same port")
    server.forget(sdir)
    port = info["port"] if info is not None else settings.port
    started = server.start(
        sdir, python, base_dir, host=settings.host, port=port, flags=flags,
        readiness_timeout_s=settings.readiness_timeout_s, log=ctx.log, check_cancelled=ctx.check_cancelled,
    )  # fmt: skip
    started["started_here"] = True
    _restore(ctx, home, sdir.name, started["url"])
    return started


def _restore(ctx, home: Path, key: str, url: str) -> None:
    """Load again what every endpoint of this server served before it stopped: versions, then each name."""
    for state in server.endpoints_on(home, key):
        current = None
        for version in state.get("versions", []):
            path = Path(version["path"])
            if not (path / "adapter_config.json").is_file():
                ctx.log(f"cannot restore {version['lora_name']}: {path} is gone (deploy it again to serve it)")
                continue
            server.load(url, version["lora_name"], path)
            if version["digest"] == state.get("current"):
                current = path
        if current is not None:
            server.load(url, state["endpoint"], current, inplace=True)
            ctx.log(f"restored endpoint {state['endpoint']!r} ({state['current']})")


def base_model_of(adapter: AdapterRecord) -> BaseModelRecord:
    try:
        return adapter.source("base_model")
    except LookupError:
        raise InputError(
            f"Adapter {adapter.uri!r} records no base_model source, so there is nothing to apply it to; "
            "re-train it so its record carries the base model."
        ) from None


def adapter_rank(adapter_dir: Path) -> int:
    """The LoRA rank an adapter needs the server to allow: its ``r``, or the largest in ``rank_pattern``."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    ranks = [int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def _local_dir(uri: str, what: str, marker: str) -> Path:
    path = local_path(uri)
    if not (path / marker).is_file():
        raise InputError(
            f"{what} directory {str(path)!r} has no {marker} (record uri {uri!r}); the vllm target serves from "
            "this machine's disk: re-materialize it here."
        )
    return path.absolute()


def endpoint_digest(adapter: AdapterRecord, base: BaseModelRecord, name: str, url: str) -> str:
    """What the endpoint serves and where: a new adapter, or a new URL, is a new version downstream."""
    canonical = json.dumps(
        {"adapter": adapter.digest, "base_model": base.digest, "model_name": name, "url": url},
        sort_keys=True,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
