"""The ``model-registry`` publisher: its settings, the checks before anything runs, and its workload."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aiplane.core.components import FactsheetPublisher
from aiplane.core.config import SecretRef
from aiplane.core.errors import ConfigError
from aiplane.core.publishing import publish_workload
from aiplane.core.records import EndpointRecord
from aiplane.core.workload import Workload

__all__ = ["ModelRegistryPublisher", "ModelRegistrySettings", "ENTRYPOINT"]

ENTRYPOINT = "aiplane.plugins.model_registry.publish:run"


class ModelRegistrySettings(BaseModel):
    """The settings of a ``model-registry`` publisher (under ``factsheet`` or ``also_publish``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    """The registry's REST address: ``https://<registry>-rest.apps.<cluster>`` (its Route), or
    ``https://<registry>.<namespace>.svc:8443`` from inside the cluster."""
    token: SecretRef | None = None
    """Bearer token by reference, ``{env: NAME}`` or ``{secret: NAME, key: KEY}``; read when publishing."""
    token_path: str | None = None
    """Or a file holding the token, read when publishing: the pod's service-account token
    (``/var/run/secrets/kubernetes.io/serviceaccount/token``), as OpenShift mounts it."""
    ca_cert: str | None = None
    """A CA bundle to verify the registry's certificate with (e.g. the service CA); empty: the system's."""
    author: str = "aiplane"
    """The author of each model version and the owner of each registered model."""
    storage_key: str | None = None
    """The data connection (its Secret's name) that reaches the artifacts' bucket, recorded on each
    model artifact so OpenShift AI's dashboard can deploy it. A name, never the keys."""
    model_format: str = "vLLM"
    """The format a whole model (``sft``, a full ``distill`` student) is registered with: what the
    serving runtime that can serve it lists (OpenShift AI's vLLM runtime lists ``vLLM``)."""
    adapter_format: str = "peft-lora"
    """The format an adapter is registered with; no runtime serves it alone, only on its base model."""
    page_url: str = ""
    """The model version's page, with ``{registered_model_id}`` and ``{version_id}``, e.g. the dashboard's
    ``https://<dashboard>/modelRegistry/<registry>/registeredModels/{registered_model_id}/versions/{version_id}/details``;
    empty: the version's REST address."""
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    """The longest one attempt may take, every call in it together."""
    attempts: int = Field(default=4, ge=1, le=10)
    """How often a registration that finds the registry unavailable is tried before publishing fails."""
    backoff_s: float = Field(default=2.0, ge=0.0, le=60.0)
    """Seconds before the second attempt; doubled for each one after."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) address; write e.g. 'https://my-registry.apps.cluster.example.com'")
        return value.strip().rstrip("/")

    @field_validator("model_format", "adapter_format", "author")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("page_url")
    @classmethod
    def _page(cls, value: str) -> str:
        try:
            value.format(registered_model_id="1", version_id="1")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{value!r} may name only {{registered_model_id}} and {{version_id}} ({exc})") from None
        return value

    @model_validator(mode="after")
    def _auth(self) -> "ModelRegistrySettings":
        if self.token is not None and self.token_path is not None:
            raise ValueError("give the token one way: `token` (a secret reference) or `token_path` (a file), not both")
        # The registry's https endpoints sit behind OpenShift's OAuth proxy: no token, no answer.
        if self.url.startswith("https://") and self.token is None and self.token_path is None:
            raise ValueError(
                "an https registry needs a bearer token: set `token_path` (e.g. the pod's service-account token, "
                "/var/run/secrets/kubernetes.io/serviceaccount/token) or `token: {secret: NAME, key: KEY}`"
            )
        return self

    def token_source(self) -> str:
        """Where the token comes from, for messages (never the token itself)."""
        if self.token_path:
            return f"the token file {self.token_path}"
        if self.token is not None:
            return f"the token {self.token!r}"
        return "no token (none is configured)"

    def resolve_token(self) -> str | None:
        """The bearer token, read now; :class:`ConfigError` when it is configured but missing or empty."""
        if self.token is not None:
            return self.token.resolve()
        if not self.token_path:
            return None
        path = Path(self.token_path).expanduser()
        try:
            value, why = path.read_text().strip(), "the file is empty"
        except OSError as exc:
            value, why = "", str(exc.strerror)
        if not value:
            raise ConfigError(
                f"Cannot read the model registry token from {self.token_path}: {why}. "
                "Mount the service account's token there, or set `token` instead."
            )
        return value

class ModelRegistryPublisher(FactsheetPublisher):
    """Registers each served adapter as a model version in the Kubeflow Model Registry."""

    name: ClassVar[str] = "model-registry"
    engines: ClassVar[tuple[str, ...] | None] = ("local",)
    Settings: ClassVar[type[BaseModel]] = ModelRegistrySettings

    def locations(self) -> dict[str, str]:
        # The metadata goes to the registry's database, which no storage location holds: per-region
        # storage must refuse this publisher rather than pretend the registry is in a region.
        return {"url": ""}

    def check(self, deployment) -> list[str]:
        s: Any = self.settings
        # A token file is the cluster's to mount (the pod's service account): a laptop checking the
        # deployment offline has none, so only a referenced variable is checked here.
        if s.token is not None and not os.environ.get(s.token.env_var):
            return [
                f"settings.token: {s.token!r} is not set; export {s.token.env_var}=... "
                "(or mount the Secret as that variable) before publishing to the model registry"
            ]
        return []

    def probe(self, deployment) -> list[str]:
        """The registry answers, and takes the token: one list request of one registered model, a few seconds at most."""
        import ssl
        import urllib.error
        import urllib.request

        s: Any = self.settings
        try:
            token = s.resolve_token()
        except ConfigError as exc:
            return [f"settings: {exc}"]
        request = urllib.request.Request(f"{s.url}/api/model_registry/v1alpha3/registered_models?pageSize=1")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        context = ssl.create_default_context(cafile=s.ca_cert) if s.url.startswith("https://") else None
        try:
            with urllib.request.urlopen(request, timeout=5, context=context):
                return []
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return [f"the model registry at {s.url} refused {s.token_source()} (HTTP {exc.code}): grant the "
                        "account the registry, or give a token that has it"]  # fmt: skip
            return [f"the model registry at {s.url} answered HTTP {exc.code} ({exc.reason}): is `url` its REST API?"]
        except (OSError, ValueError) as exc:
            return [f"the model registry at {s.url} is unreachable ({type(exc).__name__}: {exc}); check `url`"]

    def workload(self, endpoint: EndpointRecord, document: Mapping[str, Any]) -> Workload:
        """The ``publish-model-registry`` workload; its one output, ``factsheet``, is a FactsheetRecord."""
        # The settings travel as JSON; the token as its reference (or file path) only, read in the workload.
        settings = self.settings.model_dump(mode="json")
        return publish_workload("publish-model-registry", ENTRYPOINT, endpoint, document, settings=settings)
