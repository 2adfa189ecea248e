"""The ``publish-model-registry`` workload: the served adapter as a model version in the Kubeflow Model Registry.

One registered model per endpoint (its model name), one model version per
adapter digest (named by its first 12 hex digits, the full digest a custom
property), one model artifact on it with the adapter's URI and format. The
version's custom properties carry the lineage: the digests of the features
snapshot, the base model and the training run, the region the adapter was placed
in, where the factsheet was published, and the governance verdict.

Publishing is resumable and idempotent: what exists is found by name and kept,
what is missing is created, so republishing a digest changes nothing and a
publish cut short (a version without its artifact) is completed by the next.

Built on the ``model-registry`` client from PyPI, on its async API client
(``model_registry.core.ModelRegistryAPIClient``) rather than its ``ModelRegistry``
facade: the facade patches the process's asyncio (``nest_asyncio``) unless
handed a runner, sends a request in its constructor, and its ``register_model``
refuses an existing version outright, so it can neither be re-run nor finish
a half-done registration. Here every call of one attempt runs in one event loop
of our own (``asyncio.run``), bounded by ``timeout_s``; an attempt the registry
does not answer is retried, and since an attempt only adds what is missing,
retrying is safe. The client speaks the REST API ``v1alpha3`` of the spec
aiplane is checked against (model-registry 0.3.14 and older; 0.3.15 moved to ``v1``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiplane.core.errors import AiplaneError, ConfigError, InputError, WorkloadError
from aiplane.core.publishing import Attempts, publish_inputs
from aiplane.core.records import EndpointRecord, FactsheetRecord
from aiplane.core.workload import WorkloadContext

from .publisher import ModelRegistrySettings

__all__ = ["run", "publish", "registration", "Registration", "API_PATH"]

API_PATH = "/api/model_registry/v1alpha3"
_DIGEST = "aiplane.adapter.digest"


@dataclass(frozen=True)
class Registration:
    """What one adapter is registered as: the names, the artifact and the version's custom properties."""

    model: str
    version: str
    uri: str
    model_format: str
    description: str
    properties: dict[str, str | bool]


def run(ctx: WorkloadContext) -> dict[str, FactsheetRecord]:
    """Register ``ctx.inputs["endpoint"]``'s adapter, described by ``ctx.params["document"]``."""
    endpoint, document = publish_inputs(ctx)
    settings = ModelRegistrySettings.model_validate(ctx.params.get("settings") or {})
    return {"factsheet": publish(endpoint, document, settings, log=ctx.log)}


def registration(endpoint: EndpointRecord, document: Mapping[str, Any], settings: ModelRegistrySettings) -> Registration:
    """What ``document`` (see :func:`aiplane.core.factsheet.build_factsheet`) registers; pure."""
    adapter, training = _section(document, "adapter"), _section(document, "training")
    base, features = _section(document, "base_model"), _section(document, "features")
    digest, uri = adapter.get("digest"), adapter.get("uri")
    if not (isinstance(digest, str) and digest.startswith("sha256:") and isinstance(uri, str) and uri):
        raise InputError(
            "The factsheet document names no adapter digest (sha256:...) and URI: the model registry records "
            "a version per published artifact. Build the document with aiplane.core.factsheet.build_factsheet."
        )
    lineage = {step.get("kind"): step for step in document.get("lineage") or () if isinstance(step, Mapping)}
    extra = _section(document, "extra")
    full = bool((training.get("config") or {}).get("full_model"))
    placed = [p for p in document.get("placement") or () if isinstance(p, Mapping) and p.get("record") == "adapter_weights"]
    region = (placed[0].get("region") if placed else None) or extra.get("region")
    governance = _section(extra, "governance")
    rules = governance.get("rules") or []
    verdict = "no gate" if not rules else ("passed" if governance.get("passed") else "failed")
    published = [f for f in extra.get("factsheets") or () if isinstance(f, Mapping) and f.get("uri")]
    properties: dict[str, str | bool | None] = {
        _DIGEST: digest,
        "aiplane.adapter.method": training.get("method"),
        "aiplane.adapter.full_model": full,
        "aiplane.features.digest": features.get("digest"),
        "aiplane.features.table": features.get("table"),
        "aiplane.features.snapshot_id": _text(features.get("snapshot_id")),
        "aiplane.base_model.digest": base.get("digest"),
        "aiplane.base_model.uri": base.get("uri"),
        "aiplane.training_run.digest": (lineage.get("training_run") or {}).get("digest"),
        "aiplane.training_run.uri": (lineage.get("training_run") or {}).get("uri"),
        "aiplane.region": region,
        "aiplane.residency": ",".join(features.get("residency") or ()) or None,
        "aiplane.factsheet": published[0]["uri"] if published else None,
        "aiplane.factsheet.page": published[0].get("page_uri") if published else None,
        "aiplane.governance.verdict": verdict,
        "aiplane.governance.rules": json.dumps(rules, sort_keys=True) if rules else None,
        "aiplane.deployment": extra.get("deployment"),
    }
    endpoint_info = _section(document, "endpoint")
    model = str(endpoint_info.get("model_name") or endpoint.model_name)
    what = "model" if full else "adapter"
    return Registration(
        model=model,
        version=digest.removeprefix("sha256:")[:12],
        uri=uri,
        model_format=settings.model_format if full else settings.adapter_format,
        description=(
            f"{training.get('method')} {what} on {base.get('name')}, trained on {features.get('table')} "
            f"at snapshot {features.get('snapshot_id')}; {digest}"
        ),
        properties={k: v for k, v in properties.items() if v is not None and v != ""},
    )


def publish(
    endpoint: EndpointRecord,
    document: Mapping[str, Any],
    settings: ModelRegistrySettings,
    *,
    log: Callable[[str], None] = lambda message: None,
    sleep: Callable[[float], None] = time.sleep,
) -> FactsheetRecord:
    """Register the adapter ``document`` describes (see :func:`registration`) and return the record of its version."""
    wanted = registration(endpoint, document, settings)
    token = settings.resolve_token()

    def refused(exc: BaseException, reason: str, what: str) -> AiplaneError | None:
        status = getattr(exc, "status", None)
        if status in (401, 403):
            return ConfigError(
                f"The model registry at {settings.url} refused the credentials (HTTP {status}: {reason}); "
                f"check {settings.token_source()}: it must hold a token with access to the registry's service."
            )
        # 409: another publish created it between our lookup and our create; the next attempt finds it.
        if status is not None and 400 <= status < 500 and status != 409:
            return WorkloadError(f"The model registry at {settings.url} refused the registration of {wanted.model} "
                                 f"version {wanted.version}: HTTP {status}: {reason}")  # fmt: skip
        return None

    attempt = Attempts(f"The model registry at {settings.url}", settings.attempts, settings.backoff_s,
                       reason=lambda exc: _reason(exc, token), refused=refused, log=log, sleep=sleep,
                       raise_what="the publisher's `attempts` or `timeout_s`")  # fmt: skip
    # Every call of one attempt in one event loop of our own, bounded as a whole; an attempt only adds what is missing.
    found = attempt(f"register {wanted.model} version {wanted.version}",
                    lambda: asyncio.run(asyncio.wait_for(_register(settings, token, wanted, log), settings.timeout_s)))  # fmt: skip
    model_id, version_id, held = found
    uri = f"{settings.url}{API_PATH}/model_versions/{version_id}"
    page = settings.page_url.format(registered_model_id=model_id, version_id=version_id) if settings.page_url else uri
    return FactsheetRecord(uri=uri, digest=_digest(held), publisher="model-registry", page_uri=page, sources=(endpoint,))


async def _register(
    settings: ModelRegistrySettings, token: str | None, wanted: Registration, log: Callable[[str], None]
) -> tuple[str, str, dict[str, Any]]:
    """One attempt: find or create the registered model, the version and its artifact; what the registry holds."""
    from model_registry.core import ModelRegistryAPIClient
    from model_registry.types import ArtifactState, ModelArtifact, ModelVersion, RegisteredModel

    if settings.url.startswith("https://"):
        api = ModelRegistryAPIClient.secure_connection(settings.url, 443, user_token=token or "", custom_ca=settings.ca_cert)
    else:
        api = ModelRegistryAPIClient.insecure_connection(settings.url, 80, token)
    model = await api.get_registered_model_by_params(name=wanted.model)
    if model is None:
        model = await api.upsert_registered_model(
            RegisteredModel(name=wanted.model, owner=settings.author, description=f"Served by aiplane as {wanted.model}")
        )
        log(f"model registry: registered model {wanted.model!r} (id {model.id})")
    assert model.id is not None
    version = await api.get_model_version_by_params(registered_model_id=model.id, name=wanted.version)
    if version is None:
        version = await api.upsert_model_version(
            ModelVersion(name=wanted.version, author=settings.author, description=wanted.description,
                         custom_properties=wanted.properties),
            model.id,
        )  # fmt: skip
        log(f"model registry: {wanted.model} version {wanted.version} (id {version.id}) for {wanted.properties[_DIGEST]}")
    elif (version.custom_properties or {}).get(_DIGEST) != wanted.properties[_DIGEST]:
        raise InputError(
            f"Model registry version {wanted.version} of {wanted.model!r} records "
            f"{(version.custom_properties or {}).get(_DIGEST) or 'no aiplane digest'}, not {wanted.properties[_DIGEST]}: "
            "a version aiplane did not register holds that name. Rename or archive it in the registry, then publish again."
        )
    else:
        log(f"model registry: {wanted.model} version {wanted.version} is registered already")
    assert version.id is not None
    artifacts = await api.get_model_artifacts(version.id)
    artifact = next((a for a in artifacts if a.uri == wanted.uri), None)
    if artifact is None:
        artifact = await api.upsert_model_version_artifact(
            ModelArtifact(name=wanted.version, uri=wanted.uri, model_format_name=wanted.model_format,
                          model_format_version="1", storage_key=settings.storage_key, state=ArtifactState.LIVE),
            version.id,
        )  # fmt: skip
        log(f"model registry: artifact {wanted.uri} ({wanted.model_format}) on version {wanted.version}")
    held = {
        "registered_model": model.name,
        "version": version.name,
        "properties": dict(sorted((version.custom_properties or {}).items())),
        "artifact": {"uri": artifact.uri, "format": artifact.model_format_name},
    }
    return model.id, version.id, held


def _digest(held: Mapping[str, Any]) -> str:
    """Of what the registry holds for the version, so publishing it again gives the same record."""
    text = json.dumps(held, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _section(document: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = document.get(key)
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _reason(exc: BaseException, token: str | None) -> str:
    """A one-line reason for messages, with the token taken out wherever the client echoed it."""
    body = getattr(exc, "body", None) or getattr(exc, "reason", None) or str(exc)
    text = " ".join(str(body).split())[:300]
    if token:
        text = text.replace(token, "***")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
