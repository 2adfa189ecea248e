"""The preflight: everything that can be checked before the first side effect, checked at once.

``aiplane check`` prints what :func:`preflight` finds; ``aiplane up`` and the
Dagster resource run it before anything else, so a typo in a pinned target, a
trainer setting the model cannot honour, a missing base model or a serving port
in use is reported before a model is built, a row is written or an adapter is
trained. Nothing here has side effects: components answer through
:meth:`~aiplane.core.components.Component.check` and
:meth:`~aiplane.core.components.Trainer.check_model`.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import Deployment
from .errors import AiplaneError, ConfigError, PlacementError
from .placement import Requirements, place
from .plugins import DEPLOYMENT_KINDS, Registry
from .storage import is_local

__all__ = ["preflight", "raise_for_problems", "location_problems", "region_plan"]

# The workloads each component places, as the assets name them.
_WORKLOADS = {"trainer": "train-adapter", "serving": "serve-endpoint", "factsheet": "publish-factsheet"}


def preflight(
    deployment: Deployment, registry: Registry, pins: Mapping[str, str] | None = None, offline: bool = False
) -> list[str]:
    """Every problem that would stop a run of ``deployment``, one line each, empty when none.

    ``pins`` maps a component key (``trainer``, ``serving``, ``factsheet``) to a
    target the run pins it to (``aiplane up --train-target``). ``offline``: reach
    nothing outside this machine, so a base model in object storage is not read
    (and the keys to it are not needed): what a deployment for a cluster can be
    checked for on a laptop or in CI.
    """
    pins = dict(pins or {})
    for key in pins:
        if key not in _WORKLOADS:
            raise ValueError(f"pins: {key!r} is not one of {', '.join(_WORKLOADS)}")
    # Components that are not installed or have bad settings are reported here and
    # asked nothing more; the others are still checked, so one run lists everything.
    problems = registry.problems(deployment)
    components = {}
    for key, kind in DEPLOYMENT_KINDS.items():
        spec = getattr(deployment, key)
        try:
            components[key] = registry.create(kind, spec.name, spec.settings)
        except AiplaneError:
            continue
    engines = registry.components("engine")
    for key, workload in _WORKLOADS.items():
        spec = getattr(deployment, key)
        # No data has been read yet, so no residency: this finds the pins, GPUs, SLAs and
        # engines that can never work; residency is placed again, with the rows' tags, at run time.
        component = components.get(key)
        req = Requirements(
            workload=workload,
            gpus=spec.gpus,
            sla=spec.sla,
            engines=type(component).engines if component is not None else None,
            target=pins.get(key) or spec.target,
        )
        try:
            place(req, deployment.targets, deployment.residency, engines)
        except AiplaneError as exc:
            problems.append(f"{key}: {exc}")
    problems += _storage_problems(deployment)
    problems += _region_location_problems(deployment, registry, components, pins)
    if not (offline and not is_local(deployment.base_model.uri)):
        problems += _base_model_problems(deployment, registry, components.get("trainer"))
    for key, component in components.items():
        try:
            problems += [f"{key}: {p}" for p in component.check(deployment)]
        except AiplaneError as exc:
            problems.append(f"{key}: {exc}")
    for (region, key), component in _regional_components(deployment, registry).items():
        try:
            problems += [f"regions.{region}.{key}: {p}" for p in component.check(deployment.in_region(region))]
        except AiplaneError as exc:
            problems.append(f"regions.{region}.{key}: {exc}")
    return list(dict.fromkeys(problems))


def _regional_components(deployment: Deployment, registry: Registry) -> dict[tuple[str, str], object]:
    """The components regions set for themselves (``regions.<region>.<key>``), by (region, key); bad ones left out."""
    found = {}
    for region, overrides in deployment.regions.items():
        for key in overrides:
            try:
                spec = deployment.spec(key, region)
                found[region, key] = registry.create(DEPLOYMENT_KINDS[key], spec.name, spec.settings)
            except AiplaneError:
                continue  # registry.problems reports it
    return found


def region_plan(deployment: Deployment, registry: Registry) -> dict[str, dict[str, str]]:
    """Where each region's partition would place each workload: ``{region: {key: target or problem}}``.

    A problem is a line starting ``no target:``; the region's partition fails with
    it, and the other regions go on. No residency: a region's rows are those its
    residency allows, so a target in the region is all a partition asks for.
    Components are created as :func:`preflight` checks them: run it first (a bad
    setting raises here).
    """
    engines = registry.components("engine")
    plan: dict[str, dict[str, str]] = {}
    for region in deployment.regions:
        plan[region] = {}
        for key, workload in _WORKLOADS.items():
            spec = deployment.spec(key, region)
            component = registry.create(DEPLOYMENT_KINDS[key], spec.name, spec.settings)
            req = Requirements(
                workload=workload, gpus=spec.gpus, sla=spec.sla, engines=type(component).engines,
                target=spec.target, region=region,
            )  # fmt: skip
            try:
                plan[region][key] = place(req, deployment.targets, deployment.residency, engines).target
            except PlacementError as exc:
                plan[region][key] = f"no target: {exc}"
    return plan


def _storage_problems(deployment: Deployment) -> list[str]:
    """Every storage URI must have a scheme aiplane handles; with per-region storage, every target's region needs one."""
    from .storage import normalize_uri

    problems = []
    storage = deployment.storage
    for where, uri in [("storage.root", storage.root), *((f"storage.regions.{r}", u.root) for r, u in storage.regions.items())]:
        if not uri:
            continue
        try:
            normalize_uri(uri)
        except AiplaneError as exc:
            problems.append(f"{where}: {exc}")
    if storage.regions:
        for region in deployment.regions:
            if region not in storage.regions:
                problems.append(
                    f"storage.regions: region {region!r} (a partition, under `regions:`) has no storage location "
                    f"(regions with one: {', '.join(sorted(storage.regions))}); add one, so what is made there stays there"
                )
        for target in deployment.targets:
            if target.region not in storage.regions:
                problems.append(
                    f"storage.regions: target {target.name!r} is in region {target.region!r}, which has no storage "
                    f"location (regions with one: {', '.join(sorted(storage.regions))}); add one, so what is made "
                    "there stays there"
                )
    return problems


def location_problems(deployment: Deployment, component, region: str, where: str) -> list[str]:
    """Where ``component`` writes on its own (:meth:`~aiplane.core.components.Component.locations`) that is
    outside the storage location of ``region``; nothing when the deployment has no per-region storage."""
    from .storage import within

    regions = deployment.storage.regions
    if not regions or region not in regions:
        return []  # no per-region storage; or a region without a location, which _storage_problems reports
    root = regions[region].root
    problems = []
    for key, uri in component.locations().items():
        if not uri:
            problems.append(
                f"{where}.{key} is not set, so it writes where aiplane cannot hold it to region {region!r}; "
                f"set it under {root}"
            )
            continue
        try:
            inside = within(uri, root)
        except AiplaneError as exc:
            problems.append(f"{where}.{key}: {exc}")
            continue
        if not inside:
            problems.append(
                f"{where}.{key}: {uri} is outside the storage location of region {region!r} ({root}); "
                f"what is made in {region!r} stays there, so put it under {root}"
            )
    return problems


def _region_location_problems(deployment: Deployment, registry: Registry, components: dict, pins: Mapping[str, str]) -> list[str]:
    """Each target's engine writes within its region's location; each component within those of the regions it may run in."""
    if not deployment.storage.regions:
        return []
    problems = []
    for target in deployment.targets:
        try:
            engine = registry.engine(target.engine, target.settings)
        except AiplaneError:
            continue  # reported with the targets
        problems += location_problems(deployment, engine, target.region, f"targets[{target.name}].settings")
    if deployment.regions:
        # Partitioned: each region's workloads are placed in that region only, with the components it sets.
        for region in deployment.regions:
            for key in components:
                spec = deployment.spec(key, region)
                try:
                    component = registry.create(DEPLOYMENT_KINDS[key], spec.name, spec.settings)
                except AiplaneError:
                    continue  # reported with the components
                where = f"regions.{region}.{key}.settings" if key in deployment.regions[region] else f"{key}.settings"
                problems += location_problems(deployment, component, region, where)
        return list(dict.fromkeys(problems))
    for key, component in components.items():
        spec = getattr(deployment, key)
        pin = pins.get(key) or getattr(spec, "target", "")
        allowed = type(component).engines
        regions = {
            t.region for t in deployment.targets
            if (t.name == pin if pin else allowed is None or t.engine in allowed)
        }  # fmt: skip
        for region in sorted(regions):
            problems += location_problems(deployment, component, region, f"{key}.settings")
    return list(dict.fromkeys(problems))


def _base_model_problems(deployment: Deployment, registry: Registry, trainer) -> list[str]:
    uri = deployment.base_model.uri
    try:
        config = registry.pm.hook.aiplane_base_model_config(uri=uri, home=str(deployment.home), s3=deployment.storage.s3)
    except AiplaneError as exc:
        return [f"base_model.uri: {exc}"]
    if config is None:
        return [
            f"base_model.uri: no installed plugin knows {uri!r}. Give a local directory of a Hugging Face "
            "model (e.g. a download of ibm-granite/granite-3.3-2b-instruct) or 'builtin:tiny-granite'."
        ]
    if trainer is None:
        return []
    try:
        weights = registry.pm.hook.aiplane_base_model_weights(uri=uri, home=str(deployment.home), s3=deployment.storage.s3)
    except (AiplaneError, OSError, ValueError):
        weights = None  # unreadable headers: the config check below decides
    try:
        # Building even an empty model needs torch and transformers (seconds to import);
        # the weights' names, when they are here, settle the common case without them.
        if weights and trainer.check_weights(weights, uri):
            return []
        trainer.check_model(config, uri)
    except AiplaneError as exc:
        message = str(exc)
        return [message if message.startswith("trainer.") else f"trainer: {message}"]
    return []


def raise_for_problems(deployment: Deployment, problems: list[str]) -> None:
    """Raise one :class:`ConfigError` listing every problem, naming the deployment file."""
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        raise ConfigError(
            f"{deployment.source}: {count} found before anything ran; nothing was changed:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
