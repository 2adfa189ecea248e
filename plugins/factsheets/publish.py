"""The ``publish-factsheet`` workload: render a factsheet document and publish it atomically.

Everything is rendered in memory first (JSON, HTML page, loss chart), written
into a temporary directory inside the target directory and renamed into place
in one step, so a reader sees a complete factsheet folder or none. The folder
is named after the model and the digest of the JSON, so publishing the same
document again finds the folder already there and changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiplane.core.artifacts import atomic_write_text, sha256_path
from aiplane.core.errors import InputError
from aiplane.core.records import EndpointRecord, FactsheetRecord
from aiplane.core.workload import WorkloadContext

__all__ = ["run"]

_JSON, _HTML, _PNG, _LATEST = "factsheet.json", "factsheet.html", "loss.png", "latest.json"


def run(ctx: WorkloadContext) -> dict[str, FactsheetRecord]:
    """Publish ``ctx.params["document"]`` for ``ctx.inputs["endpoint"]`` under ``ctx.params["directory"]``."""
    endpoint = ctx.inputs.get("endpoint")
    document = ctx.params.get("document")
    directory = ctx.params.get("directory")
    if not isinstance(endpoint, EndpointRecord):
        raise InputError(f"publish-factsheet needs an 'endpoint' input that is an EndpointRecord; got {endpoint!r:.80}")
    if not isinstance(document, Mapping):
        raise InputError(f"publish-factsheet needs a 'document' mapping parameter; got {type(document).__name__}")
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
        png = _loss_png(document)
        page = _page(document, png)
        _publish_folder(root, folder, {_JSON: text.encode(), _HTML: page.encode(), _PNG: png})
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
        png = _loss_png(document)
        storage.write_bytes(f"{folder}/{_PNG}", png)
        storage.write_bytes(f"{folder}/{_HTML}", _page(document, png).encode())
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


def _publish_folder(root: Path, folder: Path, files: Mapping[str, bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".factsheet-"))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a published factsheet is for everyone
        try:
            os.rename(staging, folder)
        except OSError:
            # A concurrent publish of the same document won the rename: same name, same content.
            if not (folder / _JSON).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- loss chart


def _loss_points(curve: Any) -> list[tuple[float, float]]:
    """``(step, loss)`` pairs from a loss curve given as numbers, pairs or ``{step, loss}`` dicts."""
    points: list[tuple[float, float]] = []
    if not isinstance(curve, (list, tuple)):
        return points
    for i, item in enumerate(curve, start=1):
        step, loss = float(i), None
        if isinstance(item, Mapping):
            step = item.get("step", step)
            loss = item.get("loss", item.get("value"))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            step, loss = item
        else:
            loss = item
        try:
            step, loss = float(step), float(loss)
        except (TypeError, ValueError):
            continue
        if math.isfinite(step) and math.isfinite(loss):
            points.append((step, loss))
    return points


def _loss_png(document: Mapping[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = _metrics(document)
    points = _loss_points(metrics.get("loss_curve"))
    # Figure + Agg canvas, not pyplot: no global state, no display backend, safe in any thread.
    fig = Figure(figsize=(6.4, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], color="#1f5fbf", linewidth=1.6, label="training loss")
    else:
        ax.text(0.5, 0.5, "no loss curve recorded", ha="center", va="center", transform=ax.transAxes, color="#666")
    eval_loss = metrics.get("eval_loss")
    if isinstance(eval_loss, (int, float)) and math.isfinite(eval_loss):
        ax.axhline(float(eval_loss), color="#c0392b", linestyle="--", linewidth=1.2, label=f"eval loss {eval_loss:.4g}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", frameon=False)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    # No "Software" metadata, so the same curve renders to the same bytes on every matplotlib.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ---------------------------------------------------------------- HTML page


def _metrics(document: Mapping[str, Any]) -> Mapping[str, Any]:
    training = document.get("training")
    metrics = training.get("metrics") if isinstance(training, Mapping) else None
    return metrics if isinstance(metrics, Mapping) else {}


def _section(document: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = document.get(key)
    return value if isinstance(value, Mapping) else {}


def _e(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.6g}"
    elif isinstance(value, (Mapping, list, tuple)):
        value = json.dumps(value, sort_keys=True)
    elif value is None:
        value = "—"
    return html.escape(str(value), quote=True)


def _table(rows: list[tuple[Any, Any]], empty: str) -> str:
    if not rows:
        return f'<p class="none">{_e(empty)}</p>'
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _page(document: Mapping[str, Any], png: bytes) -> str:
    base, features = _section(document, "base_model"), _section(document, "features")
    training, adapter = _section(document, "training"), _section(document, "adapter")
    endpoint, by = _section(document, "endpoint"), _section(document, "generated_by")
    metrics = _metrics(document)
    model = document.get("model") or endpoint.get("model_name") or "model"
    rollback = (endpoint.get("execution") or {}).get("rollback") or {}

    headline = _table(
        [
            ("Endpoint", endpoint.get("url")),
            *([("Rolled back", f"from adapter {rollback.get('from')} to {rollback.get('to')}")] if rollback else []),
            ("Protocols", ", ".join(map(str, endpoint.get("protocols") or ())) or None),
            ("Serving", endpoint.get("serving")),
            ("Base model", f"{base.get('name')} ({base.get('architecture')}, {base.get('parameters')} parameters)"),
            ("Base model digest", base.get("digest")),
            ("Training data", f"{features.get('table')} @ snapshot {features.get('snapshot_id')}"),
            ("Rows", features.get("row_count")),
            ("Residency", ", ".join(map(str, features.get("residency") or ())) or None),
            ("Training", f"{training.get('method')} (run {training.get('run_id')})"),
            ("Adapter sha256", adapter.get("sha256") or adapter.get("digest")),
        ],
        "no facts recorded",
    )

    chain_items = []
    for step in document.get("lineage") or ():
        if isinstance(step, Mapping):
            chain_items.append(
                f'<li><span class="kind">{_e(step.get("kind"))}</span> '
                f'<code>{_e(step.get("uri"))}</code><br><small>{_e(step.get("digest"))}</small></li>'
            )
    chain = f'<ol class="chain">{"".join(chain_items)}</ol>' if chain_items else '<p class="none">no lineage recorded</p>'

    placement_rows = []
    for d in document.get("placement") or ():
        if not isinstance(d, Mapping):
            continue
        rejected = d.get("rejected") if isinstance(d.get("rejected"), Mapping) else {}
        rejected_html = (
            "<ul>" + "".join(f"<li><b>{_e(t)}</b>: {_e(r)}</li>" for t, r in rejected.items()) + "</ul>"
            if rejected
            else "none"
        )
        placement_rows.append(
            f"<tr><td>{_e(d.get('workload'))}</td><td>{_e(d.get('target'))}</td><td>{_e(d.get('engine'))}</td>"
            f"<td>{_e(d.get('region'))}</td><td>{_e(d.get('reason'))}</td><td>{rejected_html}</td></tr>"
        )
    placement = (
        '<table class="grid"><tr><th>Workload</th><th>Target</th><th>Engine</th><th>Region</th>'
        f'<th>Why</th><th>Rejected targets</th></tr>{"".join(placement_rows)}</table>'
        if placement_rows
        else '<p class="none">no placement decisions recorded</p>'
    )

    config = training.get("config") if isinstance(training.get("config"), Mapping) else {}
    config_table = _table(sorted(config.items()), "no training configuration recorded")
    evals = sorted((k, v) for k, v in metrics.items() if str(k).startswith("eval_"))
    others = sorted(
        (k, v) for k, v in metrics.items() if k != "loss_curve" and not str(k).startswith("eval_")
    )
    extra = document.get("extra") if isinstance(document.get("extra"), Mapping) else {}
    extra_html = f"<h2>Extra</h2>{_table(sorted(extra.items()), '')}" if extra else ""
    generated = (
        f"Generated by {_e(by.get('who'))} at {_e(by.get('when'))} with aiplane {_e(by.get('aiplane_version'))}"
        f" (code {_e(by.get('code_version') or 'unknown')})."
    )
    chart = base64.b64encode(png).decode()

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Factsheet: {_e(model)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
h1 {{ margin-bottom: 0.2rem; }} h2 {{ margin-top: 2rem; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 0.5rem 0; }}
th, td {{ text-align: left; vertical-align: top; padding: 0.25rem 0.6rem; border-bottom: 1px solid #eee; }}
table.kv th {{ width: 12rem; color: #555; font-weight: 600; }}
table.grid th {{ background: #f4f4f4; }}
ol.chain li {{ margin: 0.4rem 0; }} .kind {{ font-weight: 600; }}
code, small {{ word-break: break-all; }} .none, .meta {{ color: #777; }}
</style>
</head>
<body>
<h1>Factsheet: {_e(model)}</h1>
<p class="meta">{generated}</p>
<h2>Headline facts</h2>
{headline}
<h2>Lineage</h2>
{chain}
<h2>Placement decisions</h2>
{placement}
<h2>Training</h2>
<h3>Configuration</h3>
{config_table}
<h3>Metrics</h3>
{_table(others, "no training metrics recorded")}
<img src="data:image/png;base64,{chart}" alt="Training loss curve of {_e(model)}" width="640" height="320">
<h2>Evaluation</h2>
{_table(evals, "no evaluation results recorded")}
{extra_html}
</body>
</html>
"""
