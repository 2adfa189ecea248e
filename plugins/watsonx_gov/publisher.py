"""The ``watsonx-governance`` factsheet publisher: settings, validation, and its workload."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, Field, field_validator

from aiplane.core.components import FactsheetPublisher
from aiplane.core.publishing import publish_workload
from aiplane.core.records import EndpointRecord
from aiplane.core.workload import Workload

from .connection import WatsonxConnection

__all__ = ["WatsonxGovernancePublisher", "WatsonxGovernanceSettings", "ENTRYPOINT"]

ENTRYPOINT = "aiplane.plugins.watsonx_gov.publish:run"



class WatsonxGovernanceSettings(WatsonxConnection):
    """The ``factsheet.settings`` of a deployment that publishes to watsonx.governance."""

    inventory_id: str | None = None
    """The AI use case inventory (its catalog id) the use case is found in, or created in; empty: find
    the use case in any inventory the key can read, and never create one."""
    use_case: str = "aiplane"
    """The AI use case each endpoint's adapters are tracked in, found by name or created."""
    approach: str = "aiplane"
    """The approach within the use case; each new adapter is a new version of it."""
    attachments: bool = True
    """Attach the factsheet page (HTML) and the loss chart (PNG) to the model entry."""
    state_dir: str = ""
    """Where IBM's client keeps its local files (logs, MLflow store, settings); empty:
    ``<cache>/watsonx-governance`` under the deployment's home. Never the working directory or ``~``."""
    attempts: int = Field(default=4, ge=1, le=10)
    """How often a call that finds the service unavailable is tried before publishing fails."""
    backoff_s: float = Field(default=2.0, ge=0.0, le=60.0)
    """Seconds before the second attempt; doubled for each one after."""

    @field_validator("use_case", "approach")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty: it is the name the use case or approach is found by")
        return value.strip()


    def service_url(self) -> str:
        """Where the facts go: the CPD address, or the region's IBM Cloud API host."""
        if self.platform == "cpd":
            return self.url or ""
        from .client import cloud_api_url

        return cloud_api_url(self.region)


class WatsonxGovernancePublisher(FactsheetPublisher):
    """Publishes each served adapter to watsonx.governance: model entry, custom facts, attachments, AI use case."""

    name: ClassVar[str] = "watsonx-governance"
    engines: ClassVar[tuple[str, ...] | None] = ("local",)
    Settings: ClassVar[type[BaseModel]] = WatsonxGovernanceSettings

    def locations(self) -> dict[str, str]:
        # The facts leave aiplane's storage for IBM's service, which no storage location holds:
        # per-region storage must refuse this publisher rather than pretend the service is in a region.
        s: Any = self.settings
        return {"url": ""} | ({"state_dir": s.state_dir} if s.state_dir else {})

    def probe(self, deployment) -> list[str]:
        """The API key's variable, where the publish runs: this machine's environment, so not asked offline
        (a deployment checked on a laptop for a cluster gets the key from a Secret there)."""
        import os

        s: Any = self.settings
        if not os.environ.get(s.api_key.env_var):
            return [
                f"settings.api_key: {s.api_key!r} is not set; export {s.api_key.env_var}=... "
                "(or mount the Secret as that variable) before publishing to watsonx.governance"
            ]
        return []

    def workload(self, endpoint: EndpointRecord, document: Mapping[str, Any]) -> Workload:
        """The ``publish-factsheet`` workload; its one output, ``factsheet``, is a FactsheetRecord."""
        # The API key travels as its reference only, resolved in the workload.
        return publish_workload("publish-factsheet", ENTRYPOINT, endpoint, document, settings=self.settings.model_dump(mode="json"))
