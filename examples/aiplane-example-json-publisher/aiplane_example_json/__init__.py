"""An example third-party factsheet publisher: JSON and a plain HTML page in a folder of a directory.

``workload()`` only describes the work; :func:`publish` does it, wherever the engine runs it.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from aiplane.core import EndpointRecord, FactsheetPublisher, FactsheetRecord, InputError, Workload, hookimpl
from aiplane.core.artifacts import sha256_path
from aiplane.core.factsheet import publishable

__all__ = ["JsonFactsheetPublisher", "publish", "aiplane_factsheet_publishers"]


class JsonFactsheetPublisher(FactsheetPublisher["JsonFactsheetPublisher.Settings"]):
    """``self.settings`` is a :class:`Settings`: the model is declared in the class, and named in its base."""

    name = "example-json"

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        directory: str
        """Where factsheet folders are written (created if missing)."""

    def locations(self) -> dict[str, str]:
        return {"directory": self.settings.directory}

    def workload(self, endpoint: EndpointRecord, document: Mapping[str, Any]) -> Workload:
        return Workload(
            name="publish-factsheet",
            entrypoint="aiplane_example_json:publish",
            inputs={"endpoint": endpoint},
            params={"document": publishable(endpoint, document), "directory": self.settings.directory},
        )


def publish(ctx) -> dict[str, FactsheetRecord]:
    endpoint, document = ctx.inputs["endpoint"], ctx.params["document"]
    text = json.dumps(document, sort_keys=True, indent=2) + "\n"
    root = Path(ctx.params["directory"]).expanduser()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", endpoint.model_name).strip(".-") or "model"
    folder = root / f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if not (folder / "factsheet.json").is_file():
        _stage_and_rename(root, folder, text)
        ctx.log(f"published factsheet to {folder}")
    elif (folder / "factsheet.json").read_text() != text:
        raise InputError(f"{folder} holds another factsheet than its name says; remove it and publish again")
    page = folder / "index.html"
    return {
        "factsheet": FactsheetRecord(
            uri=str(folder / "factsheet.json"),
            digest=sha256_path(folder / "factsheet.json"),
            publisher=JsonFactsheetPublisher.name,
            page_uri=str(page),
            sources=(endpoint,),
        )
    }


def _stage_and_rename(root: Path, folder: Path, text: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        (staging / "factsheet.json").write_text(text)
        title = html.escape(folder.name)
        (staging / "index.html").write_text(
            f"<!doctype html><title>{title}</title><h1>{title}</h1><pre>{html.escape(text)}</pre>\n"
        )
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "factsheet.json").is_file():  # else a concurrent publish of the same document won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@hookimpl
def aiplane_factsheet_publishers():
    return [JsonFactsheetPublisher]
