"""The one Dagster resource: the deployment and the plugin registry, and how workloads are run."""


import contextlib
import logging
import os
import threading
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from aiplane.core.components import DEFAULT_ENDPOINT, endpoint_name
from aiplane.core.config import Deployment, load_deployment
from aiplane.core.errors import AiplaneError, ConfigError
from aiplane.core.homelock import hold_home
from aiplane.core.placement import Requirements, place
from aiplane.core.preflight import location_problems, preflight, raise_for_problems
from aiplane.core.plugins import DEPLOYMENT_KINDS, Registry, get_plugin_manager
from aiplane.core.records import PlacementDecision
from aiplane.core.workload import Event, Workload, WorkloadResult

__all__ = ["AiplaneResource", "prestart_serving", "prestart_training"]

_log = logging.getLogger("aiplane")


class AiplaneResource(dg.ConfigurableResource):
    """Holds the deployment (``deployments/<name>.yaml``) and the loaded plugins.

    ``deployment`` is a name or a path; empty means ``AIPLANE_DEPLOYMENT`` or
    ``local``. ``home`` overrides where local state lives (``AIPLANE_HOME``).
    """

    deployment: str = ""
    home: str = ""

    _deployment: Deployment | None = PrivateAttr(default=None)
    _registry: Registry | None = PrivateAttr(default=None)
    _held: contextlib.ExitStack | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._load()
        run = context.run
        if run is not None:
            # One materializing process per home: a run launched from the UI (or a schedule) while `aiplane up` or
            # another run works waits for it here. Re-entrant, so `aiplane up`'s own in-process runs go on.
            # Sensors (no run) only read, and must not wait.
            held = contextlib.ExitStack()
            held.enter_context(hold_home(self.config.home, f"Dagster run {run.run_id}", on_wait=context.log.info if context.log else None))
            self._held = held
        if run is not None and _trains(run):
            # The run's other steps (sources, Dagster's own set-up) overlap the trainer's imports.
            ops: Any = (run.run_config or {}).get("ops") or {}  # run config: plain JSON the run was launched with
            config = ops.get("adapter_weights") or {}
            region = run.tags.get("dagster/partition") if self.config.regions else None
            prestart_training(self.config, self.registry, (config.get("config") or {}).get("target", ""), region)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def _load(self) -> None:
        if self._deployment is None:
            deployment = load_deployment(self.deployment or None, home=self.home or None)
            registry = Registry(get_plugin_manager())
            raise_for_problems(deployment, preflight(deployment, registry))
            # Only a validated deployment is kept: a failed load fails again on the next access.
            self._deployment, self._registry = deployment, registry

    @property
    def config(self) -> Deployment:
        self._load()
        assert self._deployment is not None
        return self._deployment

    @property
    def registry(self) -> Registry:
        self._load()
        assert self._registry is not None
        return self._registry

    def component(self, spec_key: str, region: str | None = None) -> Any:
        """The component a deployment key (``trainer``, ``serving``, ...) names, with its settings
        (as region ``region`` sets them, for a per-region partition)."""
        spec = self.config.spec(spec_key, region)
        return self.registry.create(DEPLOYMENT_KINDS[spec_key], spec.name, spec.settings)

    def placed(
        self, spec_key: str, workload: str, residency: tuple[str, ...] = (), pin: str = "", region: str | None = None
    ) -> tuple[Any, PlacementDecision]:
        """The component for ``spec_key`` and where its workload runs.

        Placement is pure, so it runs, and fails, before any side effect. ``pin``
        (asset config) wins over the deployment's own ``target`` for the component.
        ``region`` (a per-region partition's) admits only targets in that region.
        """
        return _placed(self.config, self.registry, spec_key, workload, residency, pin, region)

    def run(self, context: dg.AssetExecutionContext, workload: Workload, decision: PlacementDecision) -> WorkloadResult:
        """Run ``workload`` on the engine of the chosen target, streaming its events into the run log."""
        target = self.config.target(decision.target)
        engine = self.registry.engine(target.engine, target.settings)
        # What placement reserved travels with the workload, so a Ray or KFP engine asks for it.
        resources = workload.resources.model_copy(
            update={"gpus": max(workload.resources.gpus, decision.gpus), "gpu_type": workload.resources.gpu_type or target.gpu_type}
        )
        # Storage travels with the workload by reference: the engine's side resolves the keys.
        workload = workload.model_copy(
            update={
                "resources": resources,
                "s3": workload.s3 or self.config.storage.s3,
                # A region with a store of its own: what is under its root is reached with its settings.
                "s3_routes": workload.s3_routes or self.config.storage.routes(decision.region),
                "cache_dir": workload.cache_dir or str(self.config.cache_dir()),
            }
        )
        context.log.info(f"{workload.name} ({workload.run_id}) -> target {target.name} [{engine.name}]: {decision.reason}")

        def on_event(event: Event) -> None:
            if event.message or event.type == "metric":
                context.log.info(f"[{workload.name}] {event}")

        return engine.run(workload, target, on_event)


def _trains(run: "dg.DagsterRun") -> bool:
    """Whether ``run`` executes the ``adapter_weights`` step."""
    if run.step_keys_to_execute is not None:
        return "adapter_weights" in run.step_keys_to_execute
    return run.asset_selection is not None and dg.AssetKey("adapter_weights") in run.asset_selection


def _placed(
    deployment: Deployment,
    registry: Registry,
    spec_key: str,
    workload: str,
    residency: tuple[str, ...] = (),
    pin: str = "",
    region: str | None = None,
) -> tuple[Any, PlacementDecision]:
    spec = deployment.spec(spec_key, region)
    # A serving target whose servers run here keeps their state under the deployment's home.
    options = {"home": deployment.home} if spec_key == "serving" else {}
    component = registry.create(DEPLOYMENT_KINDS[spec_key], spec.name, spec.settings, **options)
    requirements = Requirements(
        workload=workload,
        residency=tuple(residency),
        gpus=spec.gpus,
        sla=spec.sla,
        engines=type(component).engines,
        target=pin or spec.target,
        region=region,
    )
    decision = place(requirements, deployment.targets, deployment.residency, registry.components("engine"))
    # Fail closed before any side effect: what is made in the chosen region is written only there.
    target = deployment.target(decision.target)
    problems = location_problems(deployment, component, decision.region, f"{spec_key}.settings")
    problems += location_problems(
        deployment, registry.engine(target.engine, target.settings), decision.region, f"targets[{target.name}].settings"
    )
    if problems:
        raise ConfigError(f"{workload} placed on {target.name!r} in region {decision.region!r}, but: " + "; ".join(problems))
    return component, decision


def prestart_training(deployment: Deployment, registry: Registry, pin: str = "", region: str | None = None) -> None:
    """Ask the engine the training workload will probably run on to start it now (see ``Engine.prestart``).

    For where the orchestrator has seconds of its own work before ``adapter_weights``
    (``aiplane up`` checking the deployment, opening the instance, refreshing the
    sources): the trainer's process and its imports (torch and transformers take
    seconds) are then ready when training starts. A guess from placement without
    the features' residency: a wrong guess costs an unused process, never a
    different run. Problems are left to the preflight and the real placement.
    """
    try:
        trainer, decision = _placed(deployment, registry, "trainer", "train-adapter", pin=pin, region=region)
        if not trainer.entrypoint:
            return
        target = deployment.target(decision.target)
        store_spec = deployment.spec("feature_store", region)
        store = registry.create(DEPLOYMENT_KINDS["feature_store"], store_spec.name, store_spec.settings)
        engine = registry.engine(target.engine, target.settings)
    except AiplaneError:
        return
    engine.prestart(trainer.entrypoint, tuple(dict.fromkeys((*store.preload, *trainer.preload))))


def prestart_serving(
    deployment: Deployment, registry: Registry, region: str | None = None, endpoint: str = DEFAULT_ENDPOINT
) -> threading.Thread | None:
    """Serve while training, from the start of ``aiplane up``: tell the serving target the endpoint will probably
    be placed on that an adapter of the deployment's base model will be deployed as ``endpoint`` (``region``'s), as
    the ``adapter_weights`` step does when training starts (``ServingTarget.prepare``), but seconds earlier.

    In a thread of its own, which resolves the base model (as the run's ``base_model`` step does) and gives the
    hint; the thread is returned. Not a daemon: a process that ends meanwhile waits for the hint, then stops what
    the target prepared for nothing (its ``atexit`` clean-up runs after non-daemon threads end). Only for a base
    model whose weights are already on this machine's disk (:func:`_on_disk`), so the hint writes no model: one in object storage
    is downloaded by the run, the built-in one built by its first run, and the step's hint covers them. A guess
    from placement without the features' residency, like :func:`prestart_training`'s; a wrong guess or a
    failure costs nothing but the hint.
    """
    uri = deployment.base_model.uri
    if not _on_disk(deployment, registry):
        return None

    def hint() -> None:
        try:
            serving, _ = _placed(deployment, registry, "serving", "serve-endpoint", region=region)
            base = registry.resolve_base_model(uri, str(deployment.home), deployment.storage.s3)
            serving.prepare(base, endpoint_name(endpoint, region))
        except AiplaneError as exc:
            _log.debug("the serving target was not prepared ahead: %s", exc)
        except Exception as exc:  # noqa: BLE001 - a hint: the run's own steps report what is wrong
            _log.debug("the serving target was not prepared ahead: %s: %s", type(exc).__name__, exc)

    thread = threading.Thread(target=hint, name="aiplane-prestart-serving")
    thread.start()
    return thread


def _on_disk(deployment: Deployment, registry: Registry) -> bool:
    """Whether the base model's weights are on this machine already, so resolving it writes nothing: asked of
    the plugin that knows the URI (``aiplane_base_model_weights``, which has no side effects), as the preflight
    asks it. A model in object storage, or a built-in one no run has built yet, is not."""
    try:
        weights = registry.pm.hook.aiplane_base_model_weights(
            uri=deployment.base_model.uri, home=str(deployment.home), s3=deployment.storage.s3
        )
    except (AiplaneError, OSError, ValueError):
        return False  # the preflight names what is wrong with the files; the hint just does not come
    return weights is not None


def default_resource() -> AiplaneResource:
    return AiplaneResource(deployment=os.environ.get("AIPLANE_DEPLOYMENT", ""), home=os.environ.get("AIPLANE_HOME", ""))
