"""The ``publish-factsheet`` workload: render a factsheet document and publish it atomically.

Everything is rendered in memory first (JSON, and the HTML page and loss chart of
:mod:`aiplane.core.factsheet_page`), written
into a temporary directory inside the target directory and renamed into place
in one step, so a reader sees a complete factsheet folder or none. The folder
is named after the model and the digest of the JSON, so publishing the same
document again finds the folder already there and changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiplane.core.artifacts import atomic_write_text, sha256_path
from aiplane.core.errors import InputError
from aiplane.core.factsheet_page import factsheet_page, loss_chart_png
from aiplane.core.publishing import publish_inputs, staged_dir
from aiplane.core.records import EndpointRecord, FactsheetRecord
from aiplane.core.workload import WorkloadContext

__all__ = ["run"]

_JSON, _HTML, _PNG, _LATEST = "factsheet.json", "factsheet.html", "loss.png", "latest.json"


def run(ctx: WorkloadContext) -> dict[str, FactsheetRecord]:
    """Publish ``ctx.params["document"]`` for ``ctx.inputs["endpoint"]`` under ``ctx.params["directory"]``."""
    endpoint, document = publish_inputs(ctx)
    directory = ctx.params.get("directory")
    if not isinstance(directory, str) or not directory.strip():
        raise InputError("publish-factsheet needs a 'directory' parameter naming where factsheets go")

    text = json.dumps(document, sort_keys=True, indent=2) + "\n"
    short = hashlib.sha256(text.encode()).hexdigest()[:12]
    if directory.startswith("s3://"):
        return {"factsheet": _publish_to_storage(ctx, endpoint, document, text, directory.rstrip("/"), short)}
    root = Path(directory).expanduser()
    folder = root / f"{_slug(endpoint.model_name)}-{short}"
    if (folder / _JSON).is_file() and (folder / _JSON).read_text() == text:
        ctx.log(f"factsheet already published at {folder}")
    else:
        if folder.exists():
            raise InputError(
                f"{folder} exists but does not hold this factsheet (was it edited by hand?); "
                "remove it and publish again"
            )
        png = loss_chart_png(document)
        page = factsheet_page(document, png)
        # A published factsheet is for everyone (0o755); a reader sees the whole folder or none.
        with staged_dir(folder, complete=_JSON, mode=0o755) as staging:
            for name, data in {_JSON: text.encode(), _HTML: page.encode(), _PNG: png}.items():
                (staging / name).write_bytes(data)
        ctx.log(f"published factsheet to {folder}")
    atomic_write_text(root / _LATEST, text)
    json_path = folder / _JSON
    return {
        "factsheet": FactsheetRecord(
            uri=str(json_path),
            digest=sha256_path(json_path),
            publisher="local",
            page_uri=str(folder / _HTML),
            sources=(endpoint,),
        )
    }


def _publish_to_storage(
    ctx: WorkloadContext, endpoint: EndpointRecord, document: Mapping[str, Any], text: str, root: str, short: str
) -> FactsheetRecord:
    """The same folder in object storage. There is no rename there, so the JSON, which the record
    names, is written last: a reader that finds it finds the page and the chart too."""
    storage = ctx.storage
    folder = f"{root}/{_slug(endpoint.model_name)}-{short}"
    if storage.exists(f"{folder}/{_JSON}") and storage.read_bytes(f"{folder}/{_JSON}").decode() == text:
        ctx.log(f"factsheet already published at {folder}")
    else:
        png = loss_chart_png(document)
        storage.write_bytes(f"{folder}/{_PNG}", png)
        storage.write_bytes(f"{folder}/{_HTML}", factsheet_page(document, png).encode())
        storage.write_bytes(f"{folder}/{_JSON}", text.encode())
        ctx.log(f"published factsheet to {folder}")
    storage.write_bytes(f"{root}/{_LATEST}", text.encode())
    with tempfile.TemporaryDirectory(prefix="aiplane-factsheet-") as tmp:
        # The same digest a local factsheet gets: of the file, name and bytes.
        local = Path(tmp, _JSON)
        local.write_text(text)
        digest = sha256_path(local)
    return FactsheetRecord(
        uri=f"{folder}/{_JSON}", digest=digest, publisher="local", page_uri=f"{folder}/{_HTML}", sources=(endpoint,)
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:64] or "model"

