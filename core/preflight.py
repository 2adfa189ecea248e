"""The preflight: everything that can be checked before the first side effect, checked at once.

``aiplane check`` prints what :func:`preflight` finds; ``aiplane up`` and the
Dagster resource run it before anything else, so a typo in a pinned target, a
trainer setting the model cannot honour, a missing base model or a serving port
in use is reported before a model is built, a row is written or an adapter is
trained. Nothing here has side effects: components answer through
:meth:`~aiplane.core.components.Component.check` and
:meth:`~aiplane.core.components.Trainer.check_model`; the trainer's LoRA rank
and metrics are held to the serving target's limit and the governance policy
here, so neither plugin imports the other. Online (the default), what only this
machine's environment or a remote service can tell is asked too, each cheaply:
the home can be created, the S3 stores' key variables are set and their
endpoints answer, and each component's :meth:`~aiplane.core.components.Component.probe`.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Mapping
from typing import Any
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from .components import DEFAULT_ENDPOINT, Component, ServingTarget, Trainer, endpoint_name
from .config import Deployment, S3Settings
from .errors import AiplaneError, ConfigError, PlacementError
from .governance import unproduced_metrics
from .placement import Requirements, place
from .plugins import DEPLOYMENT_KINDS, Registry
from .storage import is_local

__all__ = ["preflight", "raise_for_problems", "location_problems", "region_plan"]

# The workloads each component places, as the assets name them.
_WORKLOADS = {"trainer": "train-adapter", "serving": "serve-endpoint", "factsheet": "publish-factsheet"}

PROBE_TIMEOUT_S = 3.0
"""How long a probe of a remote endpoint waits for it to answer before naming it unreachable."""


def preflight(
    deployment: Deployment, registry: Registry, pins: Mapping[str, str] | None = None, offline: bool = False
) -> list[str]:
    """Every problem that would stop a run of ``deployment``, one line each, empty when none.

    ``pins`` maps a component key (``trainer``, ``serving``, ``factsheet``) to a
    target the run pins it to (``aiplane up --train-target``). ``offline``: reach
    nothing outside this machine, so a base model in object storage is not read
    (and the keys to it are not needed): what a deployment for a cluster can be
    checked for on a laptop or in CI. Offline, nothing of this machine's environment
    is asked for either (the home, the stores' key variables): the deployment runs elsewhere.
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
    problems += _placement_problems(deployment, registry, components, pins)
    problems += _storage_problems(deployment)
    problems += _region_location_problems(deployment, registry, components, pins)
    unusable: set[str] = set()  # where the S3 settings that cannot be used are set
    if not offline:
        problems += _home_problems(deployment)
        found, unusable = _store_problems(deployment)
        problems += found
    # A model in a store named above is not read: it would fail again, or wait on a store that does not answer.
    base_store = "storage.s3" if deployment.base_model.uri.startswith("s3://") else None
    if not (offline and not is_local(deployment.base_model.uri)) and base_store not in unusable:
        problems += _base_model_problems(deployment, registry, components.get("trainer"))
    regional = _regional_components(deployment, registry)
    problems += _pairing_problems(deployment, components, "")
    for region in deployment.regions:
        mine = {key: regional.get((region, key), components.get(key)) for key in ("trainer", "serving")}
        if any((region, key) in regional for key in mine):
            problems += _pairing_problems(deployment, mine, f"regions.{region}.")
    asked = [(key, component, deployment) for key, component in components.items()]
    asked += [(f"regions.{r}.{key}", c, deployment.in_region(r)) for (r, key), c in regional.items()]
    beside, unplaced = _also_published(deployment, registry)
    problems += unplaced
    asked += [(f"also_publish[{i}]", c, deployment) for i, c in beside.items()]
    asked += [(f"targets.{name}", engine, deployment) for name, engine in _engines(deployment, registry).items()]
    for where, component, seen in asked:
        try:
            if isinstance(component, ServingTarget):
                for name in _endpoint_names(deployment, where):
                    problems += [f"{where}: {p}" for p in component.check(seen, name)]
            else:
                problems += [f"{where}: {p}" for p in component.check(seen)]
            if not offline:
                problems += [f"{where}: {p}" for p in component.probe(seen)]
        except AiplaneError as exc:
            problems.append(f"{where}: {exc}")
    return list(dict.fromkeys(problems))


def _engines(deployment: Deployment, registry: Registry) -> dict[str, Component[Any]]:
    """Each target's engine, with the target's settings; one that cannot be made is reported by ``registry.problems``."""
    engines: dict[str, Component[Any]] = {}
    for target in deployment.targets:
        try:
            engines[target.name] = registry.engine(target.engine, target.settings)
        except AiplaneError:
            continue
    return engines


def _placement_problems(
    deployment: Deployment, registry: Registry, components: Mapping[str, Component[Any]], pins: Mapping[str, str]
) -> list[str]:
    """The pins, GPUs, SLAs and engines that can never work.

    No data has been read yet, so no residency: it is placed again, with the rows' tags, at run time.
    """
    engines = registry.components("engine")
    problems = []
    for key, workload in _WORKLOADS.items():
        spec = getattr(deployment, key)
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
    return problems


def _pairing_problems(deployment: Deployment, components: Mapping[str, object], where: str) -> list[str]:
    """What the trainer makes against what serving takes and what governance asks for (``where``: a region's prefix)."""
    trainer, serving = components.get("trainer"), components.get("serving")
    trainer = trainer if isinstance(trainer, Trainer) else None
    problems = []
    if trainer is not None and isinstance(serving, ServingTarget):
        rank, limit = trainer.lora_rank(), serving.max_lora_rank()
        if rank is not None and limit is not None and rank > limit:
            problems.append(
                f"{where}trainer.settings: the LoRA rank (r) is {rank}, above the {serving.name} serving target's "
                f"max_lora_rank {limit}, so no server would load the adapter; train with r <= {limit}, or raise "
                f"{where}serving.settings.max_lora_rank to {rank} or more."
            )
    produced = trainer.produced_metrics() if trainer is not None else None
    if produced is not None:
        problems += [f"{where}{p}" if where else p for p in unproduced_metrics(deployment.governance, produced)]
    return problems


def _home_problems(deployment: Deployment) -> list[str]:
    """The home exists as a directory this user can write, or can be created.

    Tried, not inferred from permission bits (root, read-only mounts, ACLs): an empty
    directory is made where the home is, or would be created, and removed at once.
    """
    home = Path(deployment.home)
    existing = home
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    advice = "set AIPLANE_HOME (or the deployment's `home:`) to a directory this user can create and write"
    if not existing.is_dir():
        return [f"home: {home} cannot be created: {existing} is not a directory; {advice}."]
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".aiplane-check-"))
    except OSError as exc:
        what = "written" if existing == home else f"created (in {existing})"
        return [f"home: {home} cannot be {what}: {exc.strerror or exc}; {advice}."]
    return []


def _stores(deployment: Deployment) -> dict[str, tuple[S3Settings | None, list[str]]]:
    """The ``s3://`` locations of the deployment, by where the S3 settings that reach them are set."""
    storage = deployment.storage
    found: dict[str, tuple[S3Settings | None, list[str]]] = {}
    located = [("storage.s3", storage.s3, storage.root), ("storage.s3", storage.s3, deployment.base_model.uri)]
    for region, where in storage.regions.items():
        located.append((f"storage.regions.{region}.s3", where.s3, where.root) if where.s3 else ("storage.s3", storage.s3, where.root))
    for key, settings, uri in located:
        if uri.startswith("s3://"):
            found.setdefault(key, (settings, []))[1].append(uri)
    return found


def _store_problems(deployment: Deployment) -> tuple[list[str], set[str]]:
    """Each S3 store's key variables are set, and its endpoint answers; and where the settings of those
    that fail are set. Values are never read into a message, only the variables' names."""
    problems, unusable = [], set()
    stores = _stores(deployment)
    endpoints = {s.endpoint for s, _ in stores.values() if s is not None and s.endpoint}
    with ThreadPoolExecutor(max(1, len(endpoints))) as pool:
        answers = dict(zip(endpoints, pool.map(_unreachable, endpoints), strict=True))
    for where, (settings, uris) in stores.items():
        reached = ", ".join(dict.fromkeys(uris))
        if settings is None:
            continue  # the AWS SDKs' own chain of credentials, which aiplane does not read
        refs = [r for r in (settings.access_key_id, settings.secret_access_key) if r is not None]
        missing = [r.env_var for r in refs if not os.environ.get(r.env_var)]
        if missing:
            unusable.add(where)
            names = ", ".join(missing)
            one = len(missing) == 1
            problems.append(
                f"{where}: the key variable{'' if one else 's'} {names} {'is' if one else 'are'} not set, so {reached} "
                f"cannot be reached: export {missing[0]}=... (or mount the Secret as {'that variable' if one else 'those variables'}) "
                "where aiplane runs."
            )
        if settings.endpoint and answers.get(settings.endpoint):
            unusable.add(where)
            problems.append(
                f"{where}.endpoint: {settings.endpoint} is unreachable ({answers[settings.endpoint]}), so {reached} "
                "cannot be reached: start the store, or correct the endpoint."
            )
    return problems, unusable


def _unreachable(url: str) -> str:
    """Why nothing answers at ``url``'s host and port within :data:`PROBE_TIMEOUT_S`; empty when something does."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            return f"no answer within {PROBE_TIMEOUT_S:g} s"
        return exc.strerror or str(exc) or type(exc).__name__
    return ""


def _endpoint_names(deployment: Deployment, where: str) -> list[str]:
    """The endpoint names the serving target at ``where`` (``serving``, ``regions.eu.serving``) deploys, as the
    run's default endpoint config makes them: one per region it serves with per-region storage."""
    if where.startswith("regions."):
        return [endpoint_name(DEFAULT_ENDPOINT, where.removeprefix("regions.").removesuffix(".serving"))]
    if not deployment.regions:
        return [endpoint_name(DEFAULT_ENDPOINT, None)]
    own = {r for r, overrides in deployment.regions.items() if "serving" in overrides}
    return [endpoint_name(DEFAULT_ENDPOINT, r) for r in deployment.regions if r not in own]


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


def _also_published(deployment: Deployment, registry: Registry) -> tuple[dict[int, object], list[str]]:
    """The publishers of ``also_publish``, by index (bad ones left out: ``registry.problems`` reports them),
    and why any of them could not be placed, as ``factsheet`` is placed."""
    found, problems = {}, []
    engines = registry.components("engine")
    for i, spec in enumerate(deployment.also_publish):
        try:
            component = found[i] = registry.create(DEPLOYMENT_KINDS["factsheet"], spec.name, spec.settings)
        except AiplaneError:
            continue
        req = Requirements(
            workload=_WORKLOADS["factsheet"], gpus=spec.gpus, sla=spec.sla, engines=type(component).engines, target=spec.target
        )
        try:
            place(req, deployment.targets, deployment.residency, engines)
        except AiplaneError as exc:
            problems.append(f"also_publish[{i}]: {exc}")
    return found, problems


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


def location_problems(deployment: Deployment, component: Component[Any], region: str, where: str) -> list[str]:
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


def _region_location_problems(
    deployment: Deployment, registry: Registry, components: Mapping[str, Component[Any]], pins: Mapping[str, str]
) -> list[str]:
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


def _base_model_problems(deployment: Deployment, registry: Registry, trainer: Component[Any] | None) -> list[str]:
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
    try:
        weights = registry.pm.hook.aiplane_base_model_weights(uri=uri, home=str(deployment.home), s3=deployment.storage.s3)
    except AiplaneError as exc:
        return [f"base_model.uri: {exc}"]  # a weights file cut short: training would fail loading it
    except (OSError, ValueError):
        weights = None  # unreadable for another reason: the config check below decides
    if not isinstance(trainer, Trainer):
        return []
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
