"""What a rollout on a Kubernetes cluster does the same for both KServe targets (``kserve``, ``kserve-llm``).

Before anything is sent: the adapter is one a pod can read and the bytes its digest names, its rank is one
the server takes, the endpoint's object is aiplane's, and one endpoint serves one base model. The object
carries the versions it serves (newest first) in an annotation, so the next rollout keeps those intact
for rollback. After: a bounded wait that reads the object's conditions, and on a failure or a cancel the
previous spec put back (or what a first deploy created deleted), said in the error. Pure functions of
records, settings and dicts, but for :func:`wait_for` (which sleeps) and :func:`verify_entry` (which reads
the artifact store).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from .errors import ConfigError, InputError, WorkloadCancelled, WorkloadError
from .records import AdapterRecord, BaseModelRecord
from .serving import base_model_of, is_full_model, version_name
from .serving_cluster import MANAGED_BY, POD_READABLE, managed_by_aiplane

__all__ = [
    "ADAPTER_ANNOTATION",
    "VERSIONS_ANNOTATION",
    "cluster_sources",
    "condition_summary",
    "conditions_of",
    "deploy_inputs",
    "failed_conditions",
    "intact_versions",
    "lora_names",
    "next_versions",
    "object_metadata",
    "pod_placement",
    "pod_resources",
    "put_back_on_failure",
    "first_change",
    "refuse_foreign",
    "served_versions",
    "undo",
    "verify_entry",
    "wait_for",
]

T = TypeVar("T")
ADAPTER_ANNOTATION = "aiplane.io/adapter"
"""On a cluster's serving object: the digest the endpoint name serves."""
VERSIONS_ANNOTATION = "aiplane.io/versions"
"""On a cluster's serving object: every version it serves, newest first, as JSON."""


def served_versions(obj: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The versions a cluster serving object aiplane rendered serves (its :data:`VERSIONS_ANNOTATION`), newest
    (current) first; each ``{"digest", "uri"}``, ``"full_model": True`` for a whole model."""
    raw = (((obj or {}).get("metadata") or {}).get("annotations") or {}).get(VERSIONS_ANNOTATION)
    try:
        versions = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [v for v in versions if isinstance(v, dict) and {"digest", "uri"} <= set(v)]


def deploy_inputs(ctx: Any, settings: Any, target: str, rank_is: str = "") -> tuple[AdapterRecord, BaseModelRecord, bool]:
    """The deploy workload's adapter, its base model and whether it is a whole model, refused (before any
    request) unless a pod can read them (:func:`cluster_sources`) and its rank is within ``max_lora_rank``
    (``rank_is``: what that setting is called in the cluster, for the message)."""
    adapter = ctx.inputs.get("adapter")
    if not isinstance(adapter, AdapterRecord):
        raise InputError("deploy-endpoint needs an adapter_weights record as its 'adapter' input")
    base, full = cluster_sources(adapter, ctx.storage, target)
    rank = 0 if full else int(adapter.config.get("r") or 0)
    if rank > settings.max_lora_rank:
        raise ConfigError(
            f"Adapter {adapter.digest} has LoRA rank {rank}, above the {target} target's max_lora_rank "
            f"{settings.max_lora_rank}{rank_is}; raise max_lora_rank or train with a smaller r."
        )
    return adapter, base, full


def refuse_foreign(current: Mapping[str, Any] | None, what: str) -> None:
    """InputError when ``what`` exists as ``current`` and aiplane did not create it: it is not aiplane's to change."""
    if current is not None and not managed_by_aiplane(current):
        raise InputError(
            f"{what} exists and was not created by aiplane; aiplane will not change it. "
            "Serve under another endpoint name, or delete it yourself."
        )


def next_versions(
    name: str, adapter: AdapterRecord, base: BaseModelRecord, previous: Sequence[Mapping[str, Any]],
    served_base: str | None, keep: int, storage: Any, log: Callable[[str], None],
) -> list[dict[str, Any]]:  # fmt: skip
    """What endpoint ``name`` serves once ``adapter`` is rolled out over ``previous`` (what it serves now, of
    base model ``served_base``): the adapter first, then up to ``keep`` earlier ones still intact; a whole
    model alone. InputError for an adapter of another base model than the adapters served."""
    full = is_full_model(adapter)
    previous_full = bool(previous and previous[0].get("full_model"))
    if previous and not previous_full and not full and served_base != base.uri:
        raise InputError(
            f"Endpoint {name!r} serves adapters of base model {served_base}, and adapter {adapter.digest} was "
            f"trained on {base.uri}: one endpoint, one base model."
        )
    if full:
        return [{"digest": adapter.digest, "uri": adapter.uri, "full_model": True}]
    kept = [] if previous_full else [v for v in previous if v["digest"] != adapter.digest]
    return [{"digest": adapter.digest, "uri": adapter.uri}, *intact_versions(kept[:keep], storage, log)]


def undo(
    name: str, kind: str, current: Mapping[str, Any] | None, delete: Callable[[], Any], reapply: Callable[[dict[str, Any]], Any]
) -> str:
    """Put back what served before a failed rollout of ``name``: ``delete()`` what a first deploy created, or
    ``reapply`` the previous object without what the API server set on it; what was done, for the error."""
    if current is None:
        delete()
        return f"the new {kind} {name!r} was deleted"
    restore = copy.deepcopy(dict(current))
    for key in ("uid", "creationTimestamp", "generation", "managedFields"):
        restore["metadata"].pop(key, None)
    restore.pop("status", None)
    reapply(restore)
    previous = served_versions(current)
    was = "model" if previous and previous[0].get("full_model") else "adapter"
    return f"the previous spec of {name!r} was put back, so {was} {previous[0]['digest'] if previous else '?'} serves again"


class _Refused(Exception):
    """Raised by :func:`first_change` through :func:`put_back_on_failure`: nothing changed, nothing to put back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def first_change(apply: Callable[[], T]) -> T:
    """``apply()``, the rollout's first change, made inside :func:`put_back_on_failure`.

    An error it raises (the API server refused the change, or could not be reached)
    changed nothing: it is raised as it is, nothing put back. A cancel that comes
    while the request is out, or the moment it returned, may leave the change made:
    what served before is put back. Made outside the block, such a change would stay.
    """
    try:
        return apply()
    except WorkloadCancelled:
        raise
    except Exception as exc:
        raise _Refused(exc) from None


@contextmanager
def put_back_on_failure(put_back: Callable[[], str]) -> Iterator[None]:
    """Run the rollout's first change (:func:`first_change`), its wait and checks; on any failure or cancel
    call ``put_back`` (what served before serves again) and raise on: an aiplane refusal or failure as a
    WorkloadError that also says what was put back."""
    try:
        yield
    except _Refused as refused:
        raise refused.error from None
    except BaseException as exc:  # a cancel (Dagster's run termination) too; always raised on, after the undo
        undone = put_back()
        if isinstance(exc, (WorkloadError, InputError)) and not isinstance(exc, WorkloadCancelled):
            raise WorkloadError(f"{exc}; {undone}.") from None
        raise


def conditions_of(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A KServe status's conditions by type."""
    return {c.get("type"): c for c in status.get("conditions") or []}


def failed_conditions(conditions: Mapping[str, Mapping[str, Any]], passing: Callable[[Mapping[str, Any]], bool]) -> str | None:
    """What the conditions set False with a reason say (those ``passing`` lets through excepted); None if none."""
    messages = [
        f"{t}: {c.get('reason')}: {c.get('message')}" if c.get("message") else f"{t}: {c.get('reason')}"
        for t, c in conditions.items()
        if c.get("status") == "False" and c.get("reason") and not passing(c)
    ]
    return "; ".join(messages) or None


def condition_summary(conditions: Mapping[str, Mapping[str, Any]], detail: str) -> str:
    """``Ready=False (detail); ...``: each condition's status and its ``detail`` field, for progress lines."""
    return "; ".join(f"{t}={c.get('status')}" + (f" ({c.get(detail)})" if c.get(detail) else "")
                     for t, c in conditions.items())  # fmt: skip


def wait_for(ctx: Any, settings: Any, what: str, until: str, look: Callable[[], tuple[T | None, str]]) -> T:
    """``look()``'s first answer that is not None, asked every ``poll_s`` for at most ``readiness_timeout_s``;
    each new summary it gives is logged, the last one is in the WorkloadError when time runs out."""
    deadline = time.monotonic() + settings.readiness_timeout_s
    last = ""
    while True:
        ctx.check_cancelled()
        found, summary = look()
        if found is not None:
            return found
        if summary != last:
            ctx.log(f"{what}: {summary or 'no conditions yet'}")
            last = summary
        if time.monotonic() > deadline:
            raise WorkloadError(
                f"{what} was not {until} within readiness_timeout_s={settings.readiness_timeout_s:g} s"
                f" (last conditions: {summary or 'none'})"
            )
        time.sleep(settings.poll_s)


def lora_names(name: str, versions: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """The names vLLM serves ``versions`` of endpoint ``name`` under: the newest as ``name``, each as its version name."""
    if versions and versions[0].get("full_model"):
        return []
    return [(name, versions[0]), *((version_name(name, v["digest"]), v) for v in versions)]


def object_metadata(
    name: str, namespace: str, kind: str, model_uri: str, versions: Sequence[Mapping[str, Any]], **annotations: str
) -> dict[str, Any]:
    """The metadata of endpoint ``name``'s ``kind`` serving ``versions`` (newest first) on ``model_uri``:
    aiplane's label, the versions it serves; ValueError for no version, or a whole model not served alone
    as its own ``model_uri``."""
    if not versions:
        raise ValueError(f"an {kind} serves at least one version")
    if versions[0].get("full_model") and (len(versions) != 1 or versions[0]["uri"] != model_uri):
        raise ValueError(f"an {kind} serving a whole model serves it alone, as its own model URI")
    return {
        "name": name,
        "namespace": namespace,
        "labels": {**MANAGED_BY, "opendatahub.io/dashboard": "true"},
        "annotations": {
            **annotations,
            "openshift.io/display-name": name,
            ADAPTER_ANNOTATION: versions[0]["digest"],
            VERSIONS_ANNOTATION: json.dumps([dict(v) for v in versions], separators=(",", ":")),
        },
    }


def pod_resources(settings: Any) -> dict[str, Any]:
    """The vLLM container's resources: the CPU and memory requested, memory its limit, the GPUs both."""
    resources: dict[str, Any] = {
        "requests": {"cpu": settings.cpu, "memory": settings.memory},
        "limits": {"memory": settings.memory},
    }
    if settings.gpus:
        resources["requests"][settings.gpu_type] = str(settings.gpus)
        resources["limits"][settings.gpu_type] = str(settings.gpus)
    return resources


def pod_placement(settings: Any) -> dict[str, Any]:
    """The pod spec's fields the settings set: the service account (how the storage initializer gets the
    bucket's keys), the node selector and the tolerations."""
    placement: dict[str, Any] = {}
    if settings.service_account:
        placement["serviceAccountName"] = settings.service_account
    if settings.node_selector:
        placement["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        placement["tolerations"] = [t.manifest() for t in settings.tolerations]
    return placement


def cluster_sources(adapter: AdapterRecord, storage: Any, target: str) -> tuple[BaseModelRecord, bool]:
    """The base model of ``adapter`` and whether it is a whole model, once both are known to be readable by a
    KServe pod and the adapter to be the artifact its digest names: InputError for a local path or an altered
    adapter (:func:`verify_entry`), ConfigError for a base model and an adapter in different object stores
    (the pod's storage initializer fetches everything with one set of keys, its service account's).

    ``storage`` is the workload's :class:`~aiplane.core.storage.Storage`; ``target`` names the serving target
    in the messages. Raises before any request, so a refusal changes nothing.
    """
    base = base_model_of(adapter)
    full = is_full_model(adapter)
    stored = (("model", adapter.uri),) if full else (("base model", base.uri), ("adapter", adapter.uri))
    for what, uri in stored:
        if not uri.startswith(POD_READABLE):
            raise InputError(
                f"The {what} is at {uri!r}, which a KServe pod cannot read: the {target} target serves from object "
                "storage. Set the deployment's storage.root (and base_model.uri) to a bucket."
            )
    if len({storage.settings_for(uri) for _, uri in stored if uri.startswith("s3://")}) > 1:
        raise ConfigError(
            f"The base model ({base.uri}) and the adapter ({adapter.uri}) are in different object stores (the "
            "region's own, storage.regions.<region>.s3, and storage.s3), and a KServe pod fetches both with its "
            "service account's keys. Put the base model in the region's store, or serve this region with vllm."
        )
    verify_entry(adapter.uri, storage, "model" if full else "adapter")
    return base, full


def intact_versions(kept: Sequence[Mapping[str, Any]], storage: Any, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The versions in ``kept`` (those an endpoint keeps serving for rollback) still the artifacts their digests
    name: a new pod fetches each again, so one altered (or gone) since it was first served is left out, and
    ``log`` says which and why, rather than served as ``<endpoint>@<digest>``."""
    intact = []
    for version in kept:
        try:
            verify_entry(version["uri"], storage)
        except InputError as exc:
            log(f"version {version['digest']} is no longer kept for rollback: {exc}")
            continue
        intact.append(dict(version))
    return intact


def verify_entry(uri: str, storage: Any, what: str = "adapter") -> None:
    """Refuse (InputError naming it and what to do) the artifact-store entry at ``uri`` unless its bytes are
    the ones its digest names.

    For a target whose server fetches the entry itself (KServe's storage initializer), so aiplane never
    reads those bytes otherwise: called before anything is sent to the cluster. Hashes the entry whole,
    streamed from object storage.
    """
    from .storage import ArtifactStore

    root = uri.rstrip("/").rsplit("/", 2)[0]  # an entry is <root>/<kind>/<sha256 hex>
    altered = ArtifactStore(root, storage=storage).verify(uri)
    if altered:
        raise InputError(
            f"The {what} {uri!r} is not the artifact its digest names: {', '.join(altered)} changed after it was "
            "published, so it is not served and nothing was sent to the cluster. Publish it again (aiplane up "
            "--force trains and publishes it anew), or roll back to another version (aiplane rollback --to)."
        )
