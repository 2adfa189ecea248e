"""The five assets as Dagster declares them: code versions, kinds and descriptions from the deployment and
the plugins it names, the checks, the automation condition, and partitions by region when it names regions."""

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from aiplane.core.config import Deployment
from aiplane.core.errors import AiplaneError
from aiplane.core.plugins import DEPLOYMENT_KINDS, Registry

from .checks import ADAPTER_CHECKS, FEATURE_CHECKS, REGION_CHECK
from .steps import CONFIGS, adapter_weights, base_model, factsheet, features, served_endpoint

__all__ = ["ASSETS", "PARTITIONED", "build_assets", "code_version", "on_change"]

GROUP = "aiplane"

MADE_BY = {"features": "feature_store", "adapter_weights": "trainer", "served_endpoint": "serving", "factsheet": "factsheet"}
"""The deployment key whose component makes each asset; ``base_model`` is resolved from ``base_model.uri``."""


def on_change() -> dg.AutomationCondition:
    """Run when this asset's settings changed (a new code version), an upstream *data version* changed,
    an upstream asset is requested in the same tick, or this asset went missing.

    ``eager()`` reacts to every upstream materialization; a features refresh that
    found no new data still materializes, with the same data version, and must
    not retrain. What is downstream of a requested asset is requested with it,
    so one tick asks for exactly what ``aiplane up`` redoes. Failed blocking
    checks upstream hold everything back.
    """
    changed_upstream = dg.AutomationCondition.data_version_changed() | dg.AutomationCondition.will_be_requested()
    return (
        (
            dg.AutomationCondition.newly_missing()
            | dg.AutomationCondition.code_version_changed()
            | dg.AutomationCondition.any_deps_match(changed_upstream)
        ).since_last_handled()  # type: ignore[misc]  # dagster types its self as a condition on assets and checks
        & ~dg.AutomationCondition.any_deps_missing()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
        & dg.AutomationCondition.all_deps_blocking_checks_passed()
    ).with_label("settings or upstream data version changed")


def code_version(deployment: Deployment, asset: str, config: Mapping | None = None, regions: Sequence[str] = ()) -> str:
    """The asset's Dagster code version: what shapes it besides its inputs, digested.

    That is its component's spec (every region's, when partitioned: a code version
    is one per asset), aiplane's version, and the run config values that differ from
    the defaults (a pinned target). Dagster then calls an asset whose settings
    changed stale ("has a new code version"), and the automation requests it. The
    version reads ``<deployment key> <component> <digest>``, so the UI says which settings.
    """
    from aiplane.core import __version__

    key = MADE_BY.get(asset)
    spec: dict[str, Any]
    if key is None:
        spec = {"base_model": deployment.base_model.model_dump(mode="json")}
        names = [deployment.base_model.uri]
    else:
        specs = {r or "": deployment.spec(key, r) for r in (None, *regions)}
        spec = {r: s.model_dump(mode="json") for r, s in specs.items()}
        if key == "factsheet" and deployment.also_publish:
            spec["also_publish"] = [s.model_dump(mode="json") for s in deployment.also_publish]
        names = sorted({s.name for s in specs.values()})
    # A rollback is not a settings change: the rolled-back adapter stays served until adapter_weights changes.
    defaults = CONFIGS[asset]().model_dump() if asset in CONFIGS else {}
    given = {k: v for k, v in (config or {}).items() if k != "rollback_to" and defaults.get(k) != v}
    canonical = json.dumps({"aiplane": __version__, "spec": spec, "config": given}, sort_keys=True, default=str)
    return f"{key or 'base_model'} {'+'.join(names)} {hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def _kinds(deployment: Deployment | None, registry: Registry | None, asset: str, regions: Sequence[str]) -> set[str]:
    """What the UI shows on ``asset``: the kinds its component declares (``Component.kinds``), else its name,
    for every region's component; none known without a deployment."""
    key = MADE_BY.get(asset)
    if key is None:
        return {"huggingface"}
    if deployment is None or registry is None:
        return set()
    kinds: set[str] = set()
    for name in sorted({deployment.spec(key, r).name for r in (None, *regions)}):
        try:
            declared = registry.get(DEPLOYMENT_KINDS[key], name).kinds
        except AiplaneError:
            declared = ()  # not installed: the resource says so when a run starts
        kinds.update(declared or (name,))
    return kinds


def _described(text: str, deployment: Deployment | None, asset: str, regions: Sequence[str]) -> str:
    key = MADE_BY.get(asset)
    if deployment is None or key is None:
        return text
    names = sorted({deployment.spec(key, r).name for r in (None, *regions)})
    return f"{text} Made by the {DEPLOYMENT_KINDS[key]} {' / '.join(repr(n) for n in names)}."


def build_assets(
    regions: Sequence[str] = (),
    deployment: Deployment | None = None,
    registry: Registry | None = None,
    configs: Mapping[str, Mapping] | None = None,
) -> list[dg.AssetsDefinition]:
    """The five assets; with ``regions``, all but ``base_model`` partitioned by them (one partition per region).

    With ``deployment`` (and the ``registry`` of its plugins), each asset's code version
    is the digest of the settings that shape it (with ``configs``, the run config of
    each asset), and its kinds and description name the plugin that makes it.
    """
    parts = dg.StaticPartitionsDefinition(list(regions)) if regions else None
    checks = [*FEATURE_CHECKS, REGION_CHECK] if regions else FEATURE_CHECKS
    automated = on_change()

    def asset(fn, description: str, **kwargs) -> dg.AssetsDefinition:
        name = fn.__name__
        version = code_version(deployment, name, (configs or {}).get(name), regions) if deployment is not None else None
        return dg.asset(
            group_name=GROUP,
            kinds=_kinds(deployment, registry, name, regions),
            code_version=version,
            description=_described(description, deployment, name, regions),
            **kwargs,
        )(fn)

    return [
        asset(base_model, "The pretrained model adapters start from."),
        asset(
            features,
            "Training features in the feature store, pinned to a snapshot"
            + (": per region, the rows its residency allows." if regions else "."),
            partitions_def=parts,
            check_specs=checks,
        ),
        asset(
            adapter_weights,
            "The trained weights (a LoRA adapter, or a whole model for sft), in the content-addressed store.",
            partitions_def=parts,
            automation_condition=automated,
            check_specs=ADAPTER_CHECKS,
        ),
        asset(
            served_endpoint,
            "A running model server for the base model plus adapter.",
            partitions_def=parts,
            automation_condition=automated,
        ),
        asset(
            factsheet,
            "The factsheet: lineage, training, evaluation and placement of the served model.",
            partitions_def=parts,
            automation_condition=automated,
        ),
    ]


ASSETS = build_assets()
"""The unpartitioned assets (a deployment without ``regions``)."""
PARTITIONED = frozenset(a.key.to_user_string() for a in build_assets(("region",)) if a.partitions_def)
"""The assets a deployment with ``regions`` partitions by region, as :func:`build_assets` declares them."""
