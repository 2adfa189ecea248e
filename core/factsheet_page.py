"""A factsheet as people read it: one self-contained HTML page and its training loss chart.

Every factsheet publisher renders the same page (the ``factsheets`` plugin writes
it beside the JSON, ``watsonx_gov`` attaches it to the model in watsonx.governance),
so it is rendered here, once, from the document :func:`~aiplane.core.factsheet.build_factsheet`
returns. matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["factsheet_page", "loss_chart_png"]


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


def loss_chart_png(document: Mapping[str, Any]) -> bytes:
    """The training loss curve of a factsheet ``document`` (and its eval loss), as PNG bytes; the same
    document renders to the same bytes. matplotlib is imported here, not with this module."""
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


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Factsheet: {model}</title>
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
<h1>Factsheet: {model}</h1>
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
{metrics}
<img src="data:image/png;base64,{chart}" alt="Training loss curve of {model}" width="640" height="320">
<h2>Evaluation</h2>
{evals}
{extra_html}
</body>
</html>
"""
"""The page; each ``{name}`` is HTML already escaped (the CSS's braces are doubled for :meth:`str.format`)."""


def factsheet_page(document: Mapping[str, Any], png: bytes) -> str:
    """A factsheet ``document`` as one self-contained HTML page, with the loss chart ``png`` embedded."""
    training, by = _section(document, "training"), _section(document, "generated_by")
    metrics = _metrics(document)
    config = training.get("config")
    config = config if isinstance(config, Mapping) else {}
    extra = document.get("extra") if isinstance(document.get("extra"), Mapping) else {}
    return _PAGE.format(
        model=_e(document.get("model") or _section(document, "endpoint").get("model_name") or "model"),
        generated=(
            f"Generated by {_e(by.get('who'))} at {_e(by.get('when'))} with aiplane {_e(by.get('aiplane_version'))}"
            f" (code {_e(by.get('code_version') or 'unknown')})."
        ),
        headline=_headline(document),
        chain=_chain(document),
        placement=_placement(document),
        config_table=_table(sorted(config.items()), "no training configuration recorded"),
        metrics=_table(sorted((k, v) for k, v in metrics.items() if k != "loss_curve" and not str(k).startswith("eval_")),
                       "no training metrics recorded"),
        chart=base64.b64encode(png).decode(),
        evals=_table(sorted((k, v) for k, v in metrics.items() if str(k).startswith("eval_")),
                     "no evaluation results recorded"),
        extra_html=f"<h2>Extra</h2>{_table(sorted(extra.items()), '')}" if extra else "",
    )  # fmt: skip


def _headline(document: Mapping[str, Any]) -> str:
    base, features = _section(document, "base_model"), _section(document, "features")
    training, adapter = _section(document, "training"), _section(document, "adapter")
    endpoint = _section(document, "endpoint")
    rollback = (endpoint.get("execution") or {}).get("rollback") or {}
    return _table(
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


def _chain(document: Mapping[str, Any]) -> str:
    items = [
        f'<li><span class="kind">{_e(step.get("kind"))}</span> '
        f'<code>{_e(step.get("uri"))}</code><br><small>{_e(step.get("digest"))}</small></li>'
        for step in document.get("lineage") or ()
        if isinstance(step, Mapping)
    ]
    return f'<ol class="chain">{"".join(items)}</ol>' if items else '<p class="none">no lineage recorded</p>'


def _placement(document: Mapping[str, Any]) -> str:
    rows = []
    for d in document.get("placement") or ():
        if not isinstance(d, Mapping):
            continue
        rejected = d.get("rejected") if isinstance(d.get("rejected"), Mapping) else {}
        rejected_html = (
            "<ul>" + "".join(f"<li><b>{_e(t)}</b>: {_e(r)}</li>" for t, r in rejected.items()) + "</ul>"
            if rejected
            else "none"
        )
        rows.append(
            f"<tr><td>{_e(d.get('workload'))}</td><td>{_e(d.get('target'))}</td><td>{_e(d.get('engine'))}</td>"
            f"<td>{_e(d.get('region'))}</td><td>{_e(d.get('reason'))}</td><td>{rejected_html}</td></tr>"
        )
    if not rows:
        return '<p class="none">no placement decisions recorded</p>'
    return ('<table class="grid"><tr><th>Workload</th><th>Target</th><th>Engine</th><th>Region</th>'
            f'<th>Why</th><th>Rejected targets</th></tr>{"".join(rows)}</table>')  # fmt: skip
