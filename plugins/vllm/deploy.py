"""The ``deploy-endpoint`` workload of the ``vllm`` target: an adapter, or a whole model, becomes what an
endpoint name serves.

An adapter (``lora``, a LoRA ``distill`` student):

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

A whole model (``sft``, a ``distill`` student with ``student: full``: the
record's ``config["full_model"]`` is true) is served as its own base model:

1. Check first that its directory is a Hugging Face model (``config.json`` and
   weights); then provision the runtime.
2. Under its server's lock: start a server for the model itself, answering to
   the endpoint's name (``--served-model-name``), without LoRA; one server per
   model and endpoint. Send it one completion. If the server does not start,
   or that completion fails, the server is stopped and the endpoint keeps
   serving what it served, at the URL it had.
3. The switch: the endpoint's state names the new server. The endpoint's URL
   is now that server's: a switch between two whole models, or between an
   adapter and a whole model, moves the endpoint to another server, so the
   URL changes (the EndpointRecord carries the new one; the model name clients
   send stays the endpoint name).
4. The endpoint's previous server is released: a whole model's is stopped; a
   base model's unloads the endpoint's adapters, and stops when no other
   endpoint uses it. Nothing is kept loaded for rollback: deploying an earlier
   model again (a rollback) is the same path, and starts its server again.

"One endpoint, one base model" binds adapters only: an endpoint serving
adapters takes adapters of the same base model (switched in place, same URL);
a switch to a whole model, and from one to adapters of any base model, is a
move to another server. The endpoint's deploys (and its stop) are serialized by
its own lock, taken before any server's.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiplane.core.errors import ConfigError, InputError, WorkloadCancelled, WorkloadError
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord, record_to_json
from aiplane.core.serving import PROTOCOLS, base_model_of, endpoint_digest, endpoint_record, is_full_model
from aiplane.core.storage import local_path
from aiplane.core.workload import WorkloadContext

from . import _server as server
from .merge import merge_adapter, mergeable
from .runtime import ensure_vllm, preload_libraries

__all__ = ["PROTOCOLS", "base_model_of", "endpoint_digest", "endpoint_record", "is_full_model", "model_dir_of", "run"]


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
    full = is_full_model(adapter)
    edir = server.endpoint_dir(home, name)
    if full:
        model_dir = model_dir_of(str(ctx.local(adapter.uri)), adapter)
    else:
        adapter_dir = _local_dir(str(ctx.local(adapter.uri)), "Adapter", "adapter_config.json")
        base_dir = _local_dir(str(ctx.local(base.uri, base.digest)), "Base model", "config.json")
        rank = adapter_rank(adapter_dir)
        if settings.adapters == "merged":
            mergeable(adapter_dir)
        if rank > settings.max_lora_rank:
            raise ConfigError(
                f"Adapter {adapter.digest} has LoRA rank {rank}, above the vllm target's max_lora_rank "
                f"{settings.max_lora_rank}; raise max_lora_rank (one of 8, 16, 32, 64, ...) or train with a smaller r."
            )
        _check_same_base(server.read_json(edir / server.ENDPOINT_STATE), name, adapter, base)

    python = ensure_vllm(ctx.log, ctx.cancel_event)
    with server.locked(edir):
        before = server.read_json(edir / server.ENDPOINT_STATE)  # as of now, under the endpoint's lock
        if full:
            served = _serve_model(ctx, home, name, adapter, base, model_dir, python, settings, before)
        else:
            _check_same_base(before, name, adapter, base)
            serve = _serve_merged if settings.adapters == "merged" else _serve_adapter
            served = serve(ctx, home, name, adapter, base, adapter_dir, base_dir, python, settings, before)
        moved_from = before if before is not None and before.get("server") != served["key"] else None
        if moved_from is not None:
            _release_previous(ctx, home, moved_from)
    url, info = served["url"], served["info"]
    what = f"model {adapter.digest} (a whole {adapter.method} model)" if full else f"adapter {adapter.digest}"
    ctx.log(
        f"endpoint {name!r} on {url} now serves {what}"
        + (" (a rollback to an earlier version)" if served["rolled_back"] else "")
        + (f"; its URL changed from {moved_from['url']}" if moved_from is not None and moved_from.get("url") != url else "")
        + (f"; still loaded for rollback: {', '.join(served['kept'])}" if served["kept"] else "")
    )
    ctx.metrics["server_startup_s"] = info.get("startup_s", 0.0) if info.get("started_here") else 0.0
    sdir = served["server_dir"]
    return {
        "endpoint": endpoint_record(
            adapter, base, name, url, uri=f"{url}/v1/models/{name}", serving="vllm",
            handle={
                "server": sdir.name, "server_dir": str(sdir), "state_dir": str(edir), "pid": info["pid"],
                "adapter": adapter.digest, "full_model": full, "version": served["version"], "log": info["log"],
                "rolled_back": served["rolled_back"],
            },
        )
    }


def _serve_adapter(ctx, home, name, adapter, base, adapter_dir, base_dir, python, settings, before) -> dict[str, Any]:
    """Steps 2-4 for an adapter, on its base model's shared server; see the module docstring."""
    sdir = server.server_dir(home, base.digest)
    key = sdir.name
    edir = server.endpoint_dir(home, name)
    with server.locked(sdir), _stopped_if_unused(ctx, home, sdir) as info:
        info.update(_running_server(ctx, home, sdir, python, base_dir, settings))
        url = info["url"]
        version = server.version_name(name, adapter.digest)
        # The versions loaded for rollback are those on this server: none when the endpoint comes from a whole model.
        on_here = before is not None and before.get("server") == key
        versions = [v for v in (before or {}).get("versions", []) if v["digest"] != adapter.digest] if on_here else []
        was_loaded = version in server.loaded(url)
        if not was_loaded:
            server.load(url, version, adapter_dir)
        try:
            server.smoke(url, version)
        except InputError as exc:
            if not was_loaded:
                server.unload(url, version)
            raise InputError(f"Adapter {adapter.digest} was not routed to endpoint {name!r}: {exc}; {_still(before)}.") from None
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
            {"endpoint": name, "server": key, "server_dir": str(sdir), "url": url, "full_model": False,
             "base_model_digest": base.digest, "current": adapter.digest, "versions": kept,
             "history": _history(before, adapter.digest)},
        )  # fmt: skip
    return {
        "key": key, "server_dir": sdir, "url": url, "info": info, "version": version,
        "rolled_back": _rolled_back(before, adapter.digest), "kept": [v["lora_name"] for v in kept[1:]],
    }  # fmt: skip


def _serve_merged(ctx, home, name, adapter, base, adapter_dir, base_dir, python, settings, before) -> dict[str, Any]:
    """Steps 2-4 for an adapter in ``merged`` mode: its weights merged into the base model's, on the endpoint's own
    server, swapped in place; see :class:`~.target.VllmLocal.Settings` ``adapters``."""
    sdir = server.merged_server_dir(home, base.digest, name)
    key = sdir.name
    edir = server.endpoint_dir(home, name)
    merged = merge_adapter(base_dir, adapter_dir, edir / "merged" / adapter.digest.split(":")[-1][:16])
    on_here = before is not None and before.get("server") == key
    versions = [v for v in (before or {}).get("versions", []) if v["digest"] != adapter.digest] if on_here else []
    with server.locked(sdir), _stopped_if_unused(ctx, home, sdir) as info:
        info.update(_running_server(ctx, home, sdir, python, base_dir, settings, served_name=name, merged=True))
        url, previous = info["url"], Path(info["weights"])
        if previous != merged:
            # The endpoint answers from this server: new weights answer elsewhere first. Those of a version it
            # served and kept (a rollback) answered as the endpoint before, and are swapped back at once.
            kept_here = on_here and any(v["digest"] == adapter.digest for v in before.get("versions", []))
            if on_here and not kept_here:
                _candidate_answers(ctx, home, sdir, python, merged, settings, name, adapter, before)
            server.swap_weights(sdir, merged)
        try:
            server.smoke(url, name)
        except (InputError, WorkloadError) as exc:
            if previous != merged:  # what it served before, prepared base weights included
                server.swap_weights(sdir, previous)
            raise InputError(f"Adapter {adapter.digest} was not routed to endpoint {name!r}: {exc}; {_still(before)}.") from None
        entry = {
            "digest": adapter.digest, "path": str(adapter_dir), "merged": str(merged),
            "adapter": record_to_json(adapter), "deployed_at": _now(),
        }  # fmt: skip
        kept, retired = [entry, *versions][: 1 + settings.keep_previous], versions[settings.keep_previous :]
        server.write_json(
            edir / server.ENDPOINT_STATE,
            {"endpoint": name, "server": key, "server_dir": str(sdir), "url": url, "full_model": False, "mode": "merged",
             "base_model_digest": base.digest, "current": adapter.digest, "weights": str(merged), "versions": kept,
             "history": _history(before, adapter.digest)},
        )  # fmt: skip
    for old in retired:  # only their merged weights: an adapter's own files are the artifact store's
        if old.get("merged"):
            shutil.rmtree(old["merged"], ignore_errors=True)
    return {
        "key": key, "server_dir": sdir, "url": url, "info": info, "version": None,
        "rolled_back": _rolled_back(before, adapter.digest), "kept": [v["digest"] for v in kept[1:]],
    }  # fmt: skip


def _candidate_answers(ctx, home: Path, sdir: Path, python: Path, merged: Path, settings, name: str, adapter, before) -> None:
    """A server of its own loads ``merged`` and answers one completion, while the endpoint's server keeps serving
    what it served; then it is stopped. Eager (no compile): what is checked is the weights, not speed."""
    cdir = sdir.with_name(f"{sdir.name}.candidate")
    cdir.mkdir(parents=True, exist_ok=True)
    with server.locked(cdir):
        server.forget(cdir)
        try:
            started = server.start(
                cdir, python, merged, served_name=name, host=settings.host, port=0,
                flags=settings.model_copy(update={"enforce_eager": True}).flags(lora=False),
                readiness_timeout_s=settings.readiness_timeout_s, log=ctx.log, check_cancelled=ctx.check_cancelled,
            )  # fmt: skip
            server.smoke(started["url"], name)
        except (InputError, WorkloadError) as exc:
            raise InputError(
                f"Adapter {adapter.digest} merged into its base model did not answer a completion, so it was not "
                f"routed to endpoint {name!r}: {exc}; {_still(before)}."
            ) from None
        finally:
            server.forget(cdir, grace_s=5)
    ctx.log(f"adapter {adapter.digest} merged into the base model answered on a candidate server; swapping it in")


@contextlib.contextmanager
def _stopped_if_unused(ctx, home: Path, sdir: Path) -> Iterator[dict[str, Any]]:
    """A deploy that fails after it started the server (the block fills in the server's info) stops it again
    when no endpoint is served from it: it would hold its memory and cores for nothing."""
    info: dict[str, Any] = {}
    try:
        yield info
    except BaseException:  # cancelled too: a server this deploy started for nothing is stopped; re-raised
        if info.get("started_here") and not server.endpoints_on(home, sdir.name):
            server.forget(sdir)
            ctx.log(f"stopped the vLLM server on {info['url']} this deploy started: it failed, and no endpoint uses it")
        raise


def _serve_model(ctx, home, name, model, base, model_dir, python, settings, before) -> dict[str, Any]:
    """Steps 2-3 for a whole model, on a server of its own answering to the endpoint's name; see the module docstring."""
    sdir = server.model_server_dir(home, model.digest, name)
    key = sdir.name
    edir = server.endpoint_dir(home, name)
    current = before is not None and before.get("server") == key  # the endpoint serves this model already
    with server.locked(sdir):
        try:
            info = _running_server(ctx, home, sdir, python, model_dir, settings, served_name=name)
        except WorkloadCancelled:
            raise
        except WorkloadError as exc:
            raise WorkloadError(f"Model {model.digest} was not routed to endpoint {name!r}; {_still(before, key)}. {exc}") from None
        url = info["url"]
        try:
            server.smoke(url, name)
        except (InputError, WorkloadError) as exc:
            if not current:
                server.terminate(info)
                server.forget(sdir)
                ctx.log(f"stopped the vLLM server of model {model.digest} on {url}: it failed its first completion")
            raise InputError(f"Model {model.digest} was not routed to endpoint {name!r}: {exc}; {_still(before, key)}.") from None
        entry = {
            "digest": model.digest, "full_model": True, "path": str(model_dir),
            "adapter": record_to_json(model), "deployed_at": _now(),
        }  # fmt: skip
        # The switch: from now on the endpoint is this server (its state says so; the record carries its URL).
        server.write_json(
            edir / server.ENDPOINT_STATE,
            {"endpoint": name, "server": key, "server_dir": str(sdir), "url": url, "full_model": True,
             # Served as its own base model; the model it was trained from is lineage only.
             "base_model_digest": model.digest, "trained_from": base.digest, "current": model.digest,
             "versions": [entry], "history": _history(before, model.digest)},
        )  # fmt: skip
    return {
        "key": key, "server_dir": sdir, "url": url, "info": info, "version": None,
        "rolled_back": _rolled_back(before, model.digest), "kept": [],
    }  # fmt: skip


def _release_previous(ctx, home: Path, before: dict[str, Any]) -> None:
    """After a switch to another server: the endpoint's previous server stops serving it (step 4)."""
    sdir = Path(before.get("server_dir") or server.servers_dir(home) / before["server"])
    with server.locked(sdir):
        still_used = [s["endpoint"] for s in server.endpoints_on(home, sdir.name) if s.get("endpoint") != before["endpoint"]]
        try:
            running = server.release(home, sdir, before)
        except (InputError, WorkloadError) as exc:  # the switch is done; what is left is reported, not undone
            ctx.log(f"could not release endpoint {before['endpoint']!r} from the vLLM server on {before.get('url')}: {exc}")
            return
    if not running:
        return
    if still_used:
        ctx.log(f"unloaded endpoint {before['endpoint']!r} from the vLLM server on {before.get('url')}, which still "
                f"serves {', '.join(still_used)}")  # fmt: skip
    else:
        ctx.log(f"stopped the vLLM server on {before.get('url')}, which served {before['current']}: no endpoint uses it now")


def _running_server(
    ctx, home: Path, sdir: Path, python: Path, base_dir: Path, settings, served_name: str = "base", merged: bool = False
) -> dict[str, Any]:
    """The server's live process, started if it is not running; the lock is held.

    ``served_name`` ``base``: a base model's server, with LoRA on, restoring the
    endpoints it served when it starts. Otherwise a whole model's, answering to
    that endpoint name, without LoRA; with ``merged``, a merged endpoint's, started
    on the base model's weights and given back the merged weights it served.
    """
    info = server.server_info(sdir)
    adapters = served_name == "base"
    flags = settings.flags(lora=adapters)
    preload = preload_libraries(python) if settings.preload_libraries else []
    if server.alive(info) and server.healthy(info["url"]):
        same = info.get("flags") == flags and info.get("dev", False) == merged and info.get("preload", []) == preload
        if same and info["host"] == settings.host:
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
    if port and server.held_by_ours(home, port):
        # An endpoint moving between a whole model and adapters: its previous server holds the port until the switch.
        ctx.log(f"port {port} is held by another aiplane vLLM server on this machine; this one takes a free port")
        port = 0
    started = server.start(
        sdir, python, base_dir, served_name=served_name, host=settings.host, port=port, flags=flags,
        readiness_timeout_s=settings.readiness_timeout_s, log=ctx.log, check_cancelled=ctx.check_cancelled,
        dev=merged, preload=preload,
    )  # fmt: skip
    started["started_here"] = True
    if adapters:
        _restore(ctx, home, sdir.name, started["url"])
    if merged:
        for state in server.endpoints_on(home, sdir.name):  # one: the server answers to its endpoint's name
            if state.get("weights") and (Path(state["weights"]) / "config.json").is_file():
                server.swap_weights(sdir, Path(state["weights"]))
                started = server.server_info(sdir) or started
                started["started_here"] = True
                ctx.log(f"restored endpoint {state['endpoint']!r} ({state['current']}, merged)")
    return started


def _restore(ctx, home: Path, key: str, url: str) -> None:
    """Load again what every endpoint of this server served before it stopped: versions, then each name."""
    for state in server.endpoints_on(home, key):
        if state.get("full_model"):
            continue
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


def _check_same_base(state: dict[str, Any] | None, name: str, adapter: AdapterRecord, base: BaseModelRecord) -> None:
    """One endpoint, one base model, for adapters: they switch in place on the base model's server. An endpoint
    serving a whole model is on a server of its own, so an adapter of any base model moves it."""
    if state is None or state.get("full_model") or state.get("base_model_digest") == base.digest:
        return
    raise InputError(
        f"Endpoint {name!r} serves adapters of base model {state.get('base_model_digest')}, and adapter "
        f"{adapter.digest} was trained on {base.digest}: one endpoint, one base model. Serve it under another "
        "endpoint name, or stop this endpoint (`aiplane stop`) first."
    )


def _still(before: dict[str, Any] | None, key: str | None = None) -> str:
    """What the endpoint serves after a deploy that failed."""
    if before is None:
        return "it was not serving before"
    if before.get("server") == key:
        return f"it serves {before['current']} from that very server, which failed: deploy again, or deploy another model"
    return f"it keeps serving {before['current']} at {before.get('url')}"


_HISTORY = 16


def _history(before: dict[str, Any] | None, digest: str) -> list[str]:
    """What the endpoint served before what it serves now, newest first (bounded): the state's ``history``."""
    if before is None:
        return []
    earlier = [before["current"], *_served_before(before)]
    return list(dict.fromkeys(d for d in earlier if d != digest))[:_HISTORY]


def _served_before(state: dict[str, Any]) -> list[str]:
    # A state written before ``history`` existed: its versions kept for rollback.
    return state.get("history") or [v["digest"] for v in state.get("versions", [])[1:]]


def _rolled_back(before: dict[str, Any] | None, digest: str) -> bool:
    """Whether ``digest`` is something the endpoint served before what it serves now."""
    return before is not None and before.get("current") != digest and digest in _served_before(before)


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


def model_dir_of(uri: str, model: AdapterRecord) -> Path:
    """The local directory of whole model ``model``; InputError, before anything starts, unless it holds a
    Hugging Face model vLLM can load (``config.json`` and weights)."""
    path = local_path(uri)
    if not path.is_dir():
        raise InputError(
            f"Model {model.digest} ({model.method}) is at {str(path)!r}, which is not a directory on this machine "
            f"(record uri {model.uri!r}); the vllm target serves from this machine's disk: re-materialize it here."
        )
    if not (path / "config.json").is_file():
        hint = (
            " It holds a LoRA adapter (adapter_config.json), so its record should not say full_model: "
            "re-train it, or fix the record." if (path / "adapter_config.json").is_file()
            else " Re-train it, or re-materialize the directory here."
        )  # fmt: skip
        raise InputError(
            f"Model {model.digest} ({model.method}, full_model) has no config.json in {str(path)!r}, so it is not a "
            f"Hugging Face model directory the vllm target can serve.{hint}"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise InputError(
            f"Model {model.digest} ({model.method}, full_model) has no weights in {str(path)!r} (no *.safetensors "
            "or pytorch_model*.bin): re-train it, or re-materialize the directory here."
        )
    return path.absolute()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
