"""Factsheets: a machine-readable account of a served model, made only from records.

:func:`build_factsheet` walks the lineage of an :class:`EndpointRecord` (the
adapter it serves, the training run and base model behind the adapter, the
Iceberg snapshot it was trained on) and lays it out as one JSON-ready document.
Only record fields go in, never settings or handles, so no secret can reach it.
A publisher (``factsheet.name`` in a deployment) turns the document into files.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import importlib.metadata
import json
import os
import subprocess
from collections.abc import Mapping
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

from .errors import InputError
from .records import AdapterRecord, BaseModelRecord, EndpointRecord, FeaturesRecord, Record, lineage

__all__ = ["build_factsheet", "publishable", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
"""Bumped when a key of the document changes meaning or disappears."""

# The records a factsheet cannot do without, by kind, with what each one is.
_REQUIRED: tuple[tuple[str, str], ...] = (
    ("adapter_weights", "the adapter the endpoint serves"),
    ("base_model", "the base model the adapter was trained from"),
    ("features", "the feature snapshot the adapter was trained on"),
)


def build_factsheet(
    endpoint: EndpointRecord | AdapterRecord,
    *,
    who: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The factsheet document of ``endpoint``: JSON-ready, built from its lineage records only.

    Keys: ``base_model``, ``features``, ``training``, ``adapter``, ``endpoint``,
    ``placement`` (every placement decision on the way, with reasons),
    ``lineage`` (the chain features -> base model -> training run -> adapter
    -> endpoint, each ``{kind, uri, digest}``), ``generated_by`` and ``extra``.
    ``who`` defaults to ``$AIPLANE_USER``, then the login name.

    Given an :class:`AdapterRecord` instead, the document is the *draft* the
    governance gate judges before the adapter serves: ``endpoint`` is ``None``
    and the lineage ends at the adapter. ``stage`` says which: ``draft`` or ``served``.

    Raises :class:`InputError` when ``endpoint`` is not an endpoint or adapter record, when
    its lineage lacks the adapter, base model or features record, or when
    ``extra`` is not JSON-serializable.
    """
    if not isinstance(endpoint, (EndpointRecord, AdapterRecord)):
        raise InputError(
            f"A factsheet describes a served endpoint (or, as a draft, an adapter); got a {type(endpoint).__name__} "
            f"({getattr(endpoint, 'kind', '?')}). Pass the EndpointRecord of the served_endpoint asset."
        )
    served = endpoint if isinstance(endpoint, EndpointRecord) else None
    chain = list(lineage(endpoint))
    adapter, base, features = _required(chain, served)
    extra_doc = _json_ready(extra or {}, "extra")
    adapter_json = adapter.model_dump(mode="json")
    return {
        "schema_version": SCHEMA_VERSION,
        "stage": "served" if served else "draft",
        "model": served.model_name if served else None,
        "base_model": {"name": base.name, "uri": base.uri, "digest": base.digest, "architecture": base.architecture,
                       "parameters": base.parameters},  # fmt: skip
        "features": {
            "table": features.table, "snapshot_id": features.snapshot_id, "row_count": features.row_count,
            "residency": list(features.residency), "columns": list(features.columns), "uri": features.uri,
            "digest": features.digest,
        },  # fmt: skip
        "training": {"method": adapter.method, "config": adapter_json["config"], "metrics": adapter_json["metrics"],
                     "run_id": adapter.run_id, "execution": adapter_json["execution"]},  # fmt: skip
        "adapter": {
            "uri": adapter.uri,
            "digest": adapter.digest,
            "sha256": adapter.digest.removeprefix("sha256:") if adapter.digest.startswith("sha256:") else None,
        },
        "endpoint": _endpoint_section(served),
        "placement": [
            {"record": rec.kind, **placement.model_dump(mode="json")}
            for rec in reversed(chain)
            if (placement := getattr(rec, "placement", None)) is not None
        ],
        "lineage": _lineage_section(adapter, base, features, served),
        "generated_by": {
            "who": who or os.environ.get("AIPLANE_USER") or _login_name(),
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "aiplane_version": _aiplane_version(),
            "code_version": _code_version(),
        },
        "extra": extra_doc,
    }


def _required(chain: list[Record], served: EndpointRecord | None) -> tuple[AdapterRecord, BaseModelRecord, FeaturesRecord]:
    """The adapter, base model and features records of a lineage; InputError naming those it lacks."""
    found: dict[str, Record] = {}
    for rec in chain:
        found.setdefault(rec.kind, rec)
    adapter, base, features = found.get("adapter_weights"), found.get("base_model"), found.get("features")
    if isinstance(adapter, AdapterRecord) and isinstance(base, BaseModelRecord) and isinstance(features, FeaturesRecord):
        return adapter, base, features
    missing = [f"{kind} ({what})" for kind, what in _REQUIRED if kind not in found]
    name, where = (served.model_name, served.url) if served else ("(not served yet)", chain[0].uri)
    raise InputError(
        f"Cannot build a factsheet for endpoint {name!r} ({where}): its lineage has no "
        f"{', no '.join(missing)} record. Deploy the endpoint from an adapter whose sources are the base model "
        "and the features it was trained on, so the whole chain is recorded."
    )


def _endpoint_section(served: EndpointRecord | None) -> dict[str, Any] | None:
    if served is None:
        return None
    return {
        "url": served.url,
        "model_name": served.model_name,
        "protocols": list(served.protocols),
        "serving": served.serving,
        "execution": served.model_dump(mode="json")["execution"],
    }


def _lineage_section(
    adapter: AdapterRecord, base: BaseModelRecord, features: FeaturesRecord, served: EndpointRecord | None
) -> list[dict[str, Any]]:
    """The chain features -> base model -> training run -> adapter (-> endpoint), each ``{kind, uri, digest}``."""
    return [
        {"kind": "features", "uri": features.uri, "digest": features.digest},
        {"kind": "base_model", "uri": base.uri, "digest": base.digest},
        {
            "kind": "training_run",
            "uri": adapter.execution.get("run_url") or f"run:{adapter.run_id}",
            "digest": _training_run_digest(adapter, base, features),
            # Where it ran: engine, target, job/run/pipeline-version ids (scalars only, not utilisation tables).
            "execution": {k: v for k, v in sorted(adapter.execution.items()) if isinstance(v, (str, int, float, bool))},
        },
        {"kind": "adapter_weights", "uri": adapter.uri, "digest": adapter.digest},
        *([{"kind": "served_endpoint", "uri": served.url, "digest": served.digest}] if served else []),
    ]


def _json_ready(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    try:
        ready: dict[str, Any] = json.loads(json.dumps(dict(value), sort_keys=True))
        return ready
    except (TypeError, ValueError) as exc:
        raise InputError(f"Factsheet {what} must be JSON-serializable (strings, numbers, lists, dicts): {exc}") from None


def _training_run_digest(adapter: AdapterRecord, base: BaseModelRecord, features: FeaturesRecord) -> str:
    """A training run has no bytes of its own: it is pinned by everything it ran on.

    The features snapshot, the base model, the method and its settings, and the
    aiplane version the trainer recorded (``metrics["aiplane_version"]``; ``None``
    from a trainer that records none). Measurements (loss, duration) are outcomes,
    not inputs, and stay out, so rerunning the same inputs gives the same digest.
    """
    return _sha256_json(
        {
            "features": {
                "table": features.table,
                "snapshot_id": features.snapshot_id,
                "digest": features.digest,
                "row_count": features.row_count,
            },
            "base_model": base.digest,
            "method": adapter.method,
            "settings": adapter.model_dump(mode="json")["config"],
            "aiplane_version": adapter.metrics.get("aiplane_version"),
        }
    )


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers (no USER, uid without passwd entry)
        return "unknown"


def _aiplane_version() -> str:
    try:
        return importlib.metadata.version("aiplane")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


@functools.lru_cache(maxsize=1)
def _code_version() -> str | None:
    """The commit of the git checkout this package is imported from, or ``None``.

    Only when the package directory is part of the checkout (not an ignored
    directory inside one, such as a virtual environment under the repository).
    """
    here = Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5, check=False
        )

    try:
        # --dirty: a factsheet must not claim a commit the running code differs from.
        head = git("describe", "--always", "--dirty", "--abbrev=40")
        if head.returncode != 0:
            return None
        if git("check-ignore", "-q", str(here)).returncode == 0:
            return None
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit or None


def publishable(endpoint: Any, document: Any) -> dict[str, Any]:
    """``document`` as plain JSON data for a publisher's workload, after checking what it is published for.

    Every :class:`~aiplane.core.components.FactsheetPublisher` calls this in ``workload()``, so a wrong
    argument fails there, before anything runs, with the same message whatever the publisher.
    """
    import json
    from collections.abc import Mapping

    from .errors import InputError
    from .records import EndpointRecord

    if not isinstance(endpoint, EndpointRecord):
        raise InputError(f"A factsheet is published for an EndpointRecord; got {type(endpoint).__name__}")
    if not isinstance(document, Mapping):
        raise InputError(
            "The factsheet document must be a mapping (see aiplane.core.factsheet.build_factsheet); "
            f"got {type(document).__name__}"
        )
    try:
        plain: dict[str, Any] = json.loads(json.dumps(dict(document)))
        return plain
    except (TypeError, ValueError) as exc:
        raise InputError(f"The factsheet document is not JSON-serializable: {exc}") from None
