"""The ``watsonx-data`` feature store: the ``iceberg`` store on an IBM watsonx.data instance.

watsonx.data serves its Iceberg catalogs over the Iceberg REST protocol at
``https://<host>/mds/iceberg``; the catalog name is the REST ``warehouse``, and the
table files live on the instance's S3-compatible bucket. This store is the
generic REST path of :class:`~aiplane.plugins.iceberg.store.IcebergFeatureStore`
with IBM's authentication and these defaults: IBM Cloud (an API key exchanged
for IAM tokens, renewed before they expire) or Cloud Pak for Data (``ZenApiKey``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aiplane.core.config import S3Settings, SecretRef

from .store import _NAME, IcebergFeatureStore, RestAuth

__all__ = ["WatsonxDataFeatureStore"]


class WatsonxDataSettings(BaseModel):
    """The ``feature_store.settings`` of a deployment that uses ``watsonx-data``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    """The instance's address, ``https://<host>`` (the catalog is at ``<url>/mds/iceberg``)."""
    catalog: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    """The watsonx.data Iceberg catalog, e.g. ``iceberg_data``."""
    namespace: str = Field(default="aiplane", pattern=_NAME)
    """The schema the feature tables go in."""
    platform: Literal["ibm-cloud", "cpd"] = "ibm-cloud"
    """``ibm-cloud``: SaaS on IBM Cloud (IAM); ``cpd``: software on Cloud Pak for Data (``ZenApiKey``)."""
    api_key: SecretRef
    """An IBM Cloud API key (``ibm-cloud``) or the CPD user's API key (``cpd``), by reference."""
    username: str | None = None
    """The CPD user the API key belongs to (``cpd`` only)."""
    iam_url: str = "https://iam.cloud.ibm.com"
    """IBM Cloud IAM; change it only for a private or staging IAM endpoint."""
    s3: S3Settings | None = None
    """The instance's bucket (endpoint, region, HMAC keys by reference), when the catalog hands out none."""

    @field_validator("url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"url {value!r} needs its scheme, e.g. 'https://{value}'")
        return value.rstrip("/").removesuffix("/mds/iceberg")

    @model_validator(mode="after")
    def _cpd_user(self) -> "WatsonxDataSettings":
        if self.platform == "cpd" and not self.username:
            raise ValueError("username: Cloud Pak for Data authenticates a user with their API key; name the user")
        return self


class WatsonxDataFeatureStore(IcebergFeatureStore):
    """Feature tables in a watsonx.data Iceberg catalog, over its REST endpoint, IBM-authenticated."""

    name: ClassVar[str] = "watsonx-data"
    Settings: ClassVar[type[BaseModel]] = WatsonxDataSettings  # type: ignore[assignment]  # its own settings; _iceberg_settings derives the store's

    def _iceberg_settings(self) -> IcebergFeatureStore.Settings:
        s: Any = self.settings
        if s.platform == "ibm-cloud":
            auth = RestAuth(type="ibm-iam", api_key=s.api_key, iam_url=s.iam_url)
        else:
            auth = RestAuth(type="zenapikey", api_key=s.api_key, username=s.username)
        return IcebergFeatureStore.Settings(
            catalog="rest",
            catalog_uri=f"{s.url}/mds/iceberg",
            warehouse=s.catalog,
            catalog_name=s.catalog,
            namespace=s.namespace,
            auth=auth,
            s3=s.s3,
        )
