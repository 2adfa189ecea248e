"""Placement: choose the execution target for a workload, and say why.

Data residency is a hard rule: rows tagged with a residency (``eu``) are only
processed on targets in the regions the deployment's policy allows for that tag.
A tag the policy does not name (neither restricted nor declared ``any``) stops
placement: a typo must never switch a compliance rule off. GPUs, SLA class,
engine availability and a pinned target are checked too. Targets are tried in
the order the deployment lists them; the first that qualifies wins, and the
decision records why every other target was rejected.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from .config import Target
from .errors import PlacementError, unknown_name
from .records import PlacementDecision

__all__ = ["Requirements", "place", "allowed_regions", "allows_region", "normalize_tag", "unknown_tags", "ANY_REGION"]

ANY_REGION = "any"
"""A residency policy value that declares a tag unrestricted."""


class Requirements(BaseModel):
    """What a workload needs from a target."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workload: str
    residency: tuple[str, ...] = ()
    gpus: int = 0
    sla: str = "batch"
    engines: tuple[str, ...] | None = None
    """Engines the workload's component supports; ``None`` means any."""
    target: str | None = None
    """A target the workload is pinned to; it still has to qualify."""
    region: str | None = None
    """The region the workload is for (a per-region partition): only targets in it qualify."""


def normalize_tag(tag: object) -> str:
    """The canonical form of a residency tag: ``" EU "`` and ``"eu"`` are one tag."""
    return str(tag).strip().lower()


def unknown_tags(residency: Collection[str], policy: Mapping[str, Sequence[str] | str]) -> list[str]:
    """The tags the policy neither restricts nor declares unrestricted (``any``), sorted."""
    return sorted({normalize_tag(t) for t in residency} - set(policy))


def _restricting(residency: Collection[str], policy: Mapping[str, Sequence[str] | str]) -> list[str]:
    tags = {normalize_tag(t) for t in residency}
    return sorted(t for t in tags if t in policy and policy[t] != ANY_REGION)


def allowed_regions(residency: Collection[str], policy: Mapping[str, Sequence[str] | str]) -> set[str] | None:
    """Regions allowed to process data with these residency tags; ``None`` means any region.

    Raises :class:`PlacementError` for a tag the policy does not know: it fails closed.
    """
    unknown = unknown_tags(residency, policy)
    if unknown:
        known = ", ".join(sorted(policy)) or "(none)"
        raise PlacementError(
            f"residency: data tagged {', '.join(repr(t) for t in unknown)} has no rule in the deployment's residency "
            f"policy (known tags: {known}), so it may not be processed anywhere. Fix the tag in the data, or add it "
            "to `residency:` with its allowed regions (or `any` if it is unrestricted)."
        )
    allowed: set[str] | None = None
    for tag in _restricting(residency, policy):
        regions = set(policy[tag])
        allowed = regions if allowed is None else allowed & regions
    return allowed


def allows_region(tag: str, policy: Mapping[str, Sequence[str] | str], region: str) -> bool:
    """Whether data tagged ``tag`` may be processed in ``region``; a tag the policy does not know may not (fails closed)."""
    tag = normalize_tag(tag)
    if tag not in policy:
        return False
    return policy[tag] == ANY_REGION or region in policy[tag]


def _rejection(
    req: Requirements, t: Target, allowed: set[str] | None, restricting: str, installed: Collection[str]
) -> str | None:
    if req.target and t.name != req.target:
        return f"workload is pinned to target {req.target!r}"
    if req.region is not None and t.region != req.region:
        return f"in region {t.region!r}; this workload is for region {req.region!r}"
    if t.engine not in installed:
        return f"engine {t.engine!r} is not installed (installed: {', '.join(sorted(installed)) or 'none'})"
    if req.engines is not None and t.engine not in req.engines:
        return f"engine {t.engine!r} cannot run this workload (supported: {', '.join(req.engines)})"
    if allowed is not None and t.region not in allowed:
        return (
            f"residency: region {t.region!r} is outside the regions allowed for data tagged {restricting} "
            f"({', '.join(sorted(allowed)) or 'none'})"
        )
    if t.gpus < req.gpus:
        return f"has {t.gpus} GPU(s), needs {req.gpus}"
    if req.sla not in t.sla:
        return f"serves SLA classes {', '.join(t.sla)}, needs {req.sla!r}"
    return None


def place(
    req: Requirements,
    targets: Sequence[Target],
    residency_policy: Mapping[str, Sequence[str] | str],
    installed_engines: Collection[str],
) -> PlacementDecision:
    """Choose a target for ``req`` or raise :class:`PlacementError` listing every candidate's rejection.

    Pure: reads nothing and starts nothing, so it runs before any side effect.
    """
    if req.target and req.target not in {t.name for t in targets}:
        names = [t.name for t in targets]
        known = unknown_name("target", req.target, names, known_as="the deployment's").split("; ", 1)[1]
        raise PlacementError(f"{req.workload} is pinned to target {req.target!r}, which does not exist; {known}")
    allowed = allowed_regions(req.residency, residency_policy)
    restricting = ", ".join(_restricting(req.residency, residency_policy))
    rejected: dict[str, str] = {}
    chosen: Target | None = None
    for t in targets:
        why = _rejection(req, t, allowed, restricting, installed_engines)
        if why is not None:
            rejected[t.name] = why
        elif chosen is None:
            chosen = t
        else:
            rejected[t.name] = f"qualifies, but {chosen.name!r} comes first in the deployment"
    if chosen is None:
        lines = "\n".join(f"  - {name}: {why}" for name, why in rejected.items())
        region = f"region {req.region}, " if req.region is not None else ""
        raise PlacementError(
            f"No target can run {req.workload} ({region}residency {', '.join(req.residency) or 'none'}, "
            f"{req.gpus} GPU(s), SLA {req.sla}). Candidates:\n{lines}\n"
            "Add a qualifying target to the deployment or change the workload's requirements."
        )
    region_why = (
        f"residency: region {chosen.region!r} is allowed for data tagged {restricting}"
        if allowed is not None
        else "residency: no tag of the data restricts the region"
    )
    how = f"pinned to {chosen.name!r}" if req.target else "first qualifying target in deployment order"
    if req.region is not None:
        how += f" in region {req.region!r} (the partition's)"
    reason = (
        f"{how}: {region_why}; engine {chosen.engine!r}; "
        f"{chosen.gpus} GPU(s) for {req.gpus} needed; SLA {req.sla!r} served"
    )
    return PlacementDecision(
        workload=req.workload,
        target=chosen.name,
        engine=chosen.engine,
        region=chosen.region,
        reason=reason,
        gpus=req.gpus,
        rejected=rejected,
    )
