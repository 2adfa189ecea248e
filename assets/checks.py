"""The assets' checks: the features table's shape and residency (blocking), and the trained adapter's loss
(a warning) and governance gate (blocking: an adapter that fails it is never served)."""

from collections.abc import Iterator

import dagster as dg

from aiplane.core.components import FEATURE_COLUMNS
from aiplane.core.factsheet import build_factsheet
from aiplane.core.governance import judge
from aiplane.core.placement import allows_region, normalize_tag, unknown_tags
from aiplane.core.records import AdapterRecord

__all__ = ["FEATURE_CHECKS", "REGION_CHECK", "ADAPTER_CHECKS", "feature_checks", "residency_allows", "adapter_checks"]

FEATURE_CHECKS = [
    dg.AssetCheckSpec("schema", asset="features", blocking=True, description=f"Columns are exactly {', '.join(FEATURE_COLUMNS)}."),
    dg.AssetCheckSpec("not_empty", asset="features", blocking=True, description="Both train and eval splits have rows."),
    dg.AssetCheckSpec("residency_tagged", asset="features", blocking=True, description="Every row carries a residency tag."),
    dg.AssetCheckSpec(
        "residency_known",
        asset="features",
        blocking=True,
        description="Every row's residency tag has a rule in the deployment's residency policy (fails closed).",
    ),
]


REGION_CHECK = dg.AssetCheckSpec(
    "residency_allows_region",
    asset="features",
    blocking=True,
    description="Every row of the partition's table has a residency that allows the partition's region.",
)

ADAPTER_CHECKS = [
    dg.AssetCheckSpec("loss_decreased", asset="adapter_weights", description="Training loss at the end is below the start."),
    dg.AssetCheckSpec(
        "governance_gate",
        asset="adapter_weights",
        blocking=True,
        description="The adapter's draft factsheet meets the deployment's governance thresholds and required facts.",
    ),
]

_SHOWN_ROWS = 20


def residency_allows(table, policy, region: str) -> dg.AssetCheckResult:
    """Read back, not assumed: a row in the region's table whose tag does not allow the region stops the partition."""
    ids, tags = table.column("id").to_pylist(), table.column("residency").to_pylist()
    outside = [i for i, tag in zip(ids, tags, strict=True) if not allows_region(tag, policy, region)]
    return dg.AssetCheckResult(
        check_name="residency_allows_region",
        passed=not outside,
        description=f"{len(outside)} row(s) may not be processed in region {region!r}: {', '.join(outside[:_SHOWN_ROWS])}"
        if outside
        else None,
        metadata={"region": region, "rows_outside": len(outside), "tags": sorted(set(tags))},
    )


def feature_checks(table, policy, source=None) -> list[dg.AssetCheckResult]:
    """The table's checks; ``residency_known`` judges ``source`` (every row read) when given, not only those kept."""
    columns = list(table.column_names)
    missing = [c for c in FEATURE_COLUMNS if c not in columns]
    extra = [c for c in columns if c not in FEATURE_COLUMNS]
    splits = table.column("split").to_pylist() if "split" in columns else []
    residency = table.column("residency").to_pylist() if "residency" in columns else []
    untagged = sum(1 for r in residency if not r)
    n_train, n_eval = splits.count("train"), splits.count("eval")
    return [
        dg.AssetCheckResult(
            check_name="schema", passed=not missing and not extra, metadata={"missing": missing, "extra": extra}
        ),
        dg.AssetCheckResult(
            check_name="not_empty", passed=n_train > 0 and n_eval > 0, metadata={"train_rows": n_train, "eval_rows": n_eval}
        ),
        dg.AssetCheckResult(
            check_name="residency_tagged",
            passed=bool(residency) and untagged == 0,
            metadata={"untagged_rows": untagged, "tags": sorted({r for r in residency if r})},
        ),
        _residency_known(table, residency, policy)
        if source is None
        else _residency_known(source, source.column("residency").to_pylist(), policy),
    ]


def _residency_known(table, residency: list, policy) -> dg.AssetCheckResult:
    """Fail (blocking) when a row's tag has no rule: nothing may be trained on the strength of a typo."""
    unknown = set(unknown_tags([r for r in residency if r], policy))
    ids = table.column("id").to_pylist() if "id" in table.column_names else [str(i) for i in range(len(residency))]
    rows = [i for i, tag in zip(ids, residency, strict=True) if tag and normalize_tag(tag) in unknown]
    description = None
    if unknown:
        description = (
            f"{len(rows)} row(s) are tagged {', '.join(repr(t) for t in sorted(unknown))}, which the deployment's "
            f"residency policy does not know (known: {', '.join(sorted(policy)) or 'none'}); rows "
            f"{', '.join(map(str, rows[:_SHOWN_ROWS]))}{' ...' if len(rows) > _SHOWN_ROWS else ''}. "
            "Fix the tags in the source, or add them to `residency:` with their allowed regions (or `any`)."
        )
    return dg.AssetCheckResult(
        check_name="residency_known",
        passed=not unknown,
        description=description,
        metadata={"unknown_tags": sorted(unknown), "rows": len(rows), "row_ids": rows[:_SHOWN_ROWS]},
    )


def adapter_checks(record: AdapterRecord, governance) -> Iterator[dg.AssetCheckResult]:
    """``loss_decreased`` and ``governance_gate`` of a trained adapter, judged on its draft factsheet."""
    first, last = record.metrics.get("train_loss_first"), record.metrics.get("train_loss_last")
    # A warning, not a gate: an adapter that did not learn still serves, but someone should look.
    yield dg.AssetCheckResult(
        check_name="loss_decreased",
        passed=first is not None and last is not None and last < first,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={k: v for k, v in {"train_loss_first": first, "train_loss_last": last}.items() if v is not None},
    )
    # Blocking: an adapter that fails the gate is never promoted in this run (served_endpoint judges again).
    draft = build_factsheet(record)
    verdict = judge(governance, draft)
    yield dg.AssetCheckResult(
        check_name="governance_gate",
        passed=verdict.passed,
        description=verdict.summary()
        if verdict.passed
        else "; ".join(verdict.problems) + ". Not served: retrain, or change `governance:` in the deployment.",
        metadata={"rules": dg.MetadataValue.json(verdict.to_json()["rules"]), "draft_factsheet": dg.MetadataValue.json(draft)},
    )
