"""The ``local`` factsheet publisher: writes each factsheet into a folder of a local directory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator

from aiplane.core.components import FactsheetPublisher
from aiplane.core.publishing import publish_workload
from aiplane.core.records import EndpointRecord
from aiplane.core.workload import Workload

__all__ = ["LocalFactsheetPublisher", "ENTRYPOINT"]

ENTRYPOINT = "aiplane.plugins.factsheets.publish:run"


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: str
    """Where factsheet folders and ``latest.json`` are written: a local directory (created if missing)
    or ``s3://bucket/prefix`` (reached with the deployment's storage settings: ``storage.s3``, or the
    region's own store)."""

    @field_validator("directory")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a directory, e.g. '{home}/factsheets'")
        return value


class LocalFactsheetPublisher(FactsheetPublisher[_Settings]):
    """Publishes ``<directory>/<model>-<digest>/`` with ``factsheet.json``, ``factsheet.html`` and ``loss.png``."""

    name: ClassVar[str] = "local"
    engines: ClassVar[tuple[str, ...] | None] = ("local",)
    Settings: ClassVar[type[BaseModel]] = _Settings

    def locations(self) -> dict[str, str]:
        return {"directory": self.settings.directory}

    def workload(self, endpoint: EndpointRecord, document: Mapping[str, Any]) -> Workload:
        """The ``publish-factsheet`` workload; its one output, ``factsheet``, is a FactsheetRecord."""
        return publish_workload("publish-factsheet", ENTRYPOINT, endpoint, document, directory=self.settings.directory)
