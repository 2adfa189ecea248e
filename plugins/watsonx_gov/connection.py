"""How aiplane reaches a watsonx.governance instance: IBM Cloud or Cloud Pak for Data, the key by reference.

One model for the publisher's settings and the evaluation's, so both name and
check the connection the same way.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from aiplane.core.config import SecretRef

__all__ = ["WatsonxConnection", "REGIONS"]

REGIONS = ("dallas", "frankfurt", "london", "tokyo", "toronto", "sydney")
"""The IBM Cloud regions IBM's clients know by name; each has its own API host."""


class WatsonxConnection(BaseModel):
    """A watsonx.governance instance and the credential that reaches it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    platform: Literal["ibm-cloud", "cpd"] = "ibm-cloud"
    """``ibm-cloud``: the SaaS service (an IBM Cloud API key, exchanged at IAM); ``cpd``: watsonx.governance
    on Cloud Pak for Data / IBM Software Hub (``url``, ``username`` and that user's API key)."""
    api_key: SecretRef
    """The IBM Cloud API key (``ibm-cloud``) or the CPD user's API key (``cpd``), by reference:
    ``{env: WATSONX_APIKEY}`` or ``{secret: watsonx, key: apikey}``."""
    url: str | None = None
    """The Cloud Pak for Data address, ``https://cpd-host`` (``cpd`` only)."""
    username: str | None = None
    """The CPD user the API key belongs to (``cpd`` only)."""
    region: Literal["dallas", "frankfurt", "london", "tokyo", "toronto", "sydney"] = "dallas"
    """The IBM Cloud region of the watsonx.governance instance (``ibm-cloud`` only)."""
    service_instance_id: str | None = None
    """The watsonx.governance instance (``ibm-cloud``); empty: the account's default instance."""
    disable_ssl_verification: bool = False
    """Accept a CPD cluster's self-signed certificate (``cpd`` only). Prefer installing its CA."""

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("https://", "http://")):
            raise ValueError(f"url {value!r} needs its scheme, e.g. 'https://{value}'")
        return value.rstrip("/") if value else None

    @model_validator(mode="after")
    def _platform(self):
        if self.platform == "cpd":
            missing = [k for k in ("url", "username") if not getattr(self, k)]
            if missing:
                raise ValueError(
                    f"platform 'cpd' needs {' and '.join(missing)}: the cluster's address and the user the API key belongs to"
                )
        elif self.url or self.username:
            raise ValueError(
                "url and username are for platform 'cpd'; on IBM Cloud the service is found by region "
                f"({', '.join(REGIONS)}) and the API key alone"
            )
        return self
