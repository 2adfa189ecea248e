"""The plugin manager: loads every plugin, built-in or third-party, through the ``aiplane`` entry points.

``AIPLANE_LOAD_PLUGINS=a,b`` loads only the named plugins; ``AIPLANE_DISABLE_PLUGINS=c``
skips the named ones, which are still listed, as disabled, with what they provide.
A plugin that fails to import or declares a hook aiplane does not know is left
out with a warning naming its distribution; the rest load.
``AIPLANE_TRACE_HOOKS=1`` logs every hook call.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .components import Component, Engine, FactsheetPublisher, FeatureStore, ServingTarget, Trainer
from .errors import PluginError, unknown_name

if TYPE_CHECKING:
    from .config import Deployment, S3Settings
    from .records import BaseModelRecord, Record

__all__ = ["get_plugin_manager", "Registry", "PluginInfo", "BrokenPlugin", "materialization", "notify_error"]

log = logging.getLogger("aiplane.plugins")
_trace = logging.getLogger("aiplane.hooks")
GROUP = hookspecs.PROJECT


@dataclass(frozen=True)
class PluginInfo:
    """One installed plugin as ``aiplane plugins`` lists it, loaded or disabled."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]
    components: tuple[tuple[str, str], ...] = ()
    """``(kind, name)`` of every component it provides: ``("engine", "local")``, ``("trainer", "lora")``."""
    disabled_by: str | None = None
    """The environment variable that keeps it from loading (``AIPLANE_DISABLE_PLUGINS`` or
    ``AIPLANE_LOAD_PLUGINS``); ``None`` when it is loaded."""


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that was found but could not be loaded, and why."""

    name: str
    distribution: str | None
    version: str | None
    error: str


@dataclass
class _Loaded:
    broken: list[BrokenPlugin] = field(default_factory=list)
    dists: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    # name -> (entry point, (distribution, version), the variable that left it out)
    disabled: dict[str, tuple[importlib.metadata.EntryPoint, tuple[str | None, str | None], str]] = field(
        default_factory=dict
    )


class _Manager(pluggy.PluginManager):
    """pluggy's manager, holding what loading the entry points found (for listings and error messages)."""

    def __init__(self) -> None:
        super().__init__(GROUP)
        self.loaded = _Loaded()


def _loaded(pm: pluggy.PluginManager) -> _Loaded:
    """What loading the entry points found; nothing for a manager :func:`get_plugin_manager` did not make."""
    return pm.loaded if isinstance(pm, _Manager) else _Loaded()


def _names(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def get_plugin_manager(entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh plugin manager with the hookspecs added and the installed plugins loaded."""
    pm = _Manager()
    pm.add_hookspecs(hookspecs)
    if os.environ.get("AIPLANE_TRACE_HOOKS"):
        _trace_hooks(pm)
    if entry_points:
        _load_entry_points(pm)
    pm.check_pending()
    return pm


def _trace_hooks(pm: pluggy.PluginManager) -> None:
    """Log every hook call and its outcome to stderr (``AIPLANE_TRACE_HOOKS=1``)."""
    trace = _trace
    if not trace.handlers:
        trace.addHandler(logging.StreamHandler())
        trace.setLevel(logging.INFO)

    def before(name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        trace.info("hook %s(%s) -> %s", name, ", ".join(kwargs), ", ".join(i.plugin_name for i in impls))

    def after(outcome: pluggy.Result[Any], name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        exc = outcome.exception
        trace.info("hook %s %s", name, f"raised {type(exc).__name__}: {exc}" if exc else "returned")

    pm.add_hookcall_monitoring(before, after)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allow, block = _names("AIPLANE_LOAD_PLUGINS"), _names("AIPLANE_DISABLE_PLUGINS") or set()
    state = _loaded(pm)
    entry_points = sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name)
    available = {ep.name for ep in entry_points}
    for var, names in (("AIPLANE_LOAD_PLUGINS", allow or set()), ("AIPLANE_DISABLE_PLUGINS", block)):
        for name in sorted(names - available):
            log.warning("%s names %s", var, unknown_name("plugin", name, available))
    for ep in entry_points:
        dist = getattr(ep, "dist", None)
        dist_info = (dist.metadata["Name"], dist.version) if dist else (None, None)
        if ep.name in block or (allow is not None and ep.name not in allow):
            var = "AIPLANE_DISABLE_PLUGINS" if ep.name in block else "AIPLANE_LOAD_PLUGINS"
            state.disabled[ep.name] = (ep, dist_info, var)
            continue
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a third-party bug must not take the core down
            _mark_broken(pm, ep.name, dist_info, exc)
            continue
        try:
            # Fails loudly on a misspelled hook, naming only this plugin.
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=ep.name)
            _mark_broken(pm, ep.name, dist_info, exc)
            continue
        state.dists[ep.name] = dist_info
        log.debug("loaded plugin %s-%s", ep.name, dist_info[1])


def _mark_broken(pm: pluggy.PluginManager, name: str, dist_info: tuple[str | None, str | None], exc: BaseException) -> None:
    dist, version = dist_info
    broken = BrokenPlugin(name, dist, version, f"{type(exc).__name__}: {exc}")
    _loaded(pm).broken.append(broken)
    log.warning(
        "aiplane plugin %r from distribution %s %s failed to load and is skipped: %s "
        "(fix or uninstall it, or set AIPLANE_DISABLE_PLUGINS=%s)",
        name, dist or "(unknown)", version or "", broken.error, name,
    )


DEPLOYMENT_KINDS: dict[str, str] = {
    "feature_store": "feature store",
    "trainer": "trainer",
    "serving": "serving target",
    "factsheet": "factsheet publisher",
}
"""Deployment key -> the kind of component it names."""

_KINDS: dict[str, tuple[str, type[Component[Any]]]] = {
    "engine": ("aiplane_engines", Engine),
    "feature store": ("aiplane_feature_stores", FeatureStore),
    "trainer": ("aiplane_trainers", Trainer),
    "serving target": ("aiplane_serving_targets", ServingTarget),
    "factsheet publisher": ("aiplane_factsheet_publishers", FactsheetPublisher),
}


class Registry:
    """The components the loaded plugins provide, looked up by name with helpful errors."""

    def __init__(self, pm: pluggy.PluginManager | None = None):
        self.pm = pm or get_plugin_manager()
        self._disabled: list[PluginInfo] | None = None

    def components(self, kind: str) -> dict[str, type[Component[Any]]]:
        hook_name, base = _KINDS[kind]
        found: dict[str, type[Component[Any]]] = {}
        for impl_result in getattr(self.pm.hook, hook_name)():
            for cls in impl_result or ():
                if not (isinstance(cls, type) and issubclass(cls, base)):
                    raise PluginError(
                        f"{self._owner(cls)}: {hook_name} returned {cls!r}, which is not a {base.__name__} subclass"
                    )
                if cls.name in found and found[cls.name] is not cls:
                    # Silently preferring one would make behaviour depend on load order.
                    first, second = self._owner(found[cls.name]), self._owner(cls)
                    raise PluginError(
                        f"Two plugins provide the {kind} {cls.name!r}: {first} and {second}. "
                        "Uninstall one, or disable one with AIPLANE_DISABLE_PLUGINS."
                    )
                found[cls.name] = cls
        return found

    def _owner(self, obj: Any) -> str:
        """The plugin an object comes from, by module, for error messages."""
        module = getattr(obj, "__module__", "") or ""
        for name, plugin in self.pm.list_name_plugin():
            root = getattr(plugin, "__name__", None) or type(plugin).__module__
            if module == root or module.startswith(root + "."):
                return f"plugin {name!r}"
        return f"module {module!r}"

    def get(self, kind: str, name: str) -> type[Component[Any]]:
        found = self.components(kind)
        if name not in found:
            raise PluginError(self._not_found(kind, name, found))
        return found[name]

    def _not_found(self, kind: str, name: str, found: Any) -> str:
        """Why ``name`` is not among the loaded components of ``kind``, and what to do about it."""
        for info in self._disabled_plugins():
            if (kind, name) in info.components:
                how = _how_to_enable(info.name, info.disabled_by)
                return f"The {kind} {name!r} comes from plugin {info.name!r}, which is disabled: {how}"
        return unknown_name(kind, name, found, hint=self._broken_hint())

    def create(self, kind: str, name: str, settings: Any = None, **options: Any) -> Any:
        """An instance of the named component with validated settings (and its kind's ``options``:
        a serving target's ``home``)."""
        cls = self.get(kind, name)
        try:
            return cls(settings, **options)
        except PluginError as exc:  # a class that leaves out a method aiplane calls: say whose it is
            raise PluginError(f"{self._owner(cls)}: {exc}") from None

    def engine(self, name: str, settings: Any = None) -> Engine[Any]:
        engine: Engine[Any] = self.create("engine", name, settings)
        return engine

    def validate(self, deployment: Deployment) -> None:
        """Check that every component and engine a deployment names is installed and accepts its settings.

        Raises one :class:`ConfigError` listing every problem, naming the file and key.
        """
        from .errors import ConfigError

        problems = self.problems(deployment)
        if problems:
            raise ConfigError(f"{deployment.source}: invalid deployment:\n" + "\n".join(f"  {p}" for p in problems))

    def problems(self, deployment: Deployment) -> list[str]:
        """What :meth:`validate` would report, one line per problem (``key: what is wrong``)."""
        from .errors import AiplaneError

        problems = []
        for key, kind in DEPLOYMENT_KINDS.items():
            spec = getattr(deployment, key)
            try:
                self.create(kind, spec.name, spec.settings)
            except AiplaneError as exc:
                problems.append(f"{key}: {exc}")
        for region, overrides in deployment.regions.items():
            for key in overrides:
                try:
                    spec = deployment.spec(key, region)
                    self.create(DEPLOYMENT_KINDS[key], spec.name, spec.settings)
                except AiplaneError as exc:
                    problems.append(f"regions.{region}.{key}: {exc}")
        for i, spec in enumerate(deployment.also_publish):
            try:
                self.create(DEPLOYMENT_KINDS["factsheet"], spec.name, spec.settings)
            except AiplaneError as exc:
                problems.append(f"also_publish[{i}]: {exc}")
        engines = self.components("engine")
        for i, target in enumerate(deployment.targets):
            if target.engine not in engines:
                problems.append(f"targets[{i}].engine: " + self._not_found("engine", target.engine, engines))
            else:
                try:
                    engines[target.engine](target.settings)
                except AiplaneError as exc:
                    problems.append(f"targets[{i}].settings: {exc}")
        plugins = [name for name, _ in self.pm.list_name_plugin()]
        disabled = _loaded(self.pm).disabled
        for name in deployment.observers:
            if name in disabled:
                problems.append(f"observers.{name}: plugin {name!r} is disabled: " + _how_to_enable(name, disabled[name][2]))
            elif name not in plugins:
                problems.append(f"observers.{name}: " + unknown_name("plugin", name, plugins))
        return problems

    def _broken_hint(self) -> str:
        broken = _loaded(self.pm).broken
        if not broken:
            return ""
        return "Plugins that failed to load: " + ", ".join(f"{b.name} ({b.distribution})" for b in broken) + "."

    def plugins(self) -> list[PluginInfo]:
        """Every installed plugin, loaded or disabled, by name: distribution, version, hooks and components."""
        state = _loaded(self.pm)
        loaded = [
            _info(self.pm, name, plugin, state.dists.get(name, (None, None)))
            for name, plugin in self.pm.list_name_plugin()
            if plugin is not None  # None: a name pluggy blocks
        ]
        return sorted(loaded + self._disabled_plugins(), key=lambda p: p.name)

    def _disabled_plugins(self) -> list[PluginInfo]:
        """The plugins ``AIPLANE_DISABLE_PLUGINS`` or ``AIPLANE_LOAD_PLUGINS`` left out, with what they provide.

        Each is imported into a scratch manager, never this one, only to learn its
        components, so that asking for one of them can say which plugin to enable.
        One that fails to import is listed without components.
        """
        if self._disabled is None:
            state = _loaded(self.pm)
            self._disabled = []
            for name, (ep, dist_info, var) in sorted(state.disabled.items()):
                scratch = pluggy.PluginManager(GROUP)
                scratch.add_hookspecs(hookspecs)
                try:
                    plugin = ep.load()
                    scratch.register(plugin, name=name)
                except Exception as exc:  # it is disabled; its bugs must not break listing the others
                    log.debug("disabled plugin %r could not be inspected: %s: %s", name, type(exc).__name__, exc)
                    self._disabled.append(PluginInfo(name, *dist_info, (), (), var))
                    continue
                self._disabled.append(_info(scratch, name, plugin, dist_info, var))
        return self._disabled

    @property
    def broken(self) -> list[BrokenPlugin]:
        return list(_loaded(self.pm).broken)

    def resolve_base_model(self, uri: str, home: str, s3: S3Settings | None = None) -> BaseModelRecord:
        record: BaseModelRecord | None = self.pm.hook.aiplane_resolve_base_model(uri=uri, home=home, s3=s3)
        if record is None:
            from .errors import InputError

            raise InputError(
                f"Base model {uri!r} not found: not a directory with a config.json and no plugin knows this URI. "
                "Give a local directory of a Hugging Face model (e.g. a download of "
                "ibm-granite/granite-3.3-2b-instruct) or 'builtin:tiny-granite'."
            )
        return record


def _info(
    pm: pluggy.PluginManager, name: str, plugin: object, dist_info: tuple[str | None, str | None], disabled_by: str | None = None
) -> PluginInfo:
    hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or ()))
    return PluginInfo(name, *dist_info, hooks, _provided(pm, plugin), disabled_by)


def _provided(pm: pluggy.PluginManager, plugin: object) -> tuple[tuple[str, str], ...]:
    """``(kind, name)`` of the components ``plugin`` provides, asked through its own component hooks."""
    others = [p for p in pm.get_plugins() if p is not plugin]
    out: list[tuple[str, str]] = []
    for kind, (hook_name, base) in _KINDS.items():
        try:
            results = pm.subset_hook_caller(hook_name, others)()
        except Exception as exc:  # listing must survive a plugin's bug; using the component reports it
            log.warning("plugin %r failed in %s: %s: %s", pm.get_name(plugin), hook_name, type(exc).__name__, exc)
            continue
        out += [(kind, c.name) for r in results for c in r or () if isinstance(c, type) and issubclass(c, base)]
    return tuple(out)


def _how_to_enable(plugin: str, disabled_by: str | None) -> str:
    if disabled_by == "AIPLANE_DISABLE_PLUGINS":
        return f"AIPLANE_DISABLE_PLUGINS names it. Remove {plugin!r} from AIPLANE_DISABLE_PLUGINS to use it."
    return (
        f"AIPLANE_LOAD_PLUGINS loads only the plugins it names. Add {plugin!r} to AIPLANE_LOAD_PLUGINS, "
        "or unset it to load every installed plugin."
    )


def _notify(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> None:
    """Call the hook for each observer in turn; one failing observer neither fails the asset nor silences the others.

    Each call goes through pluggy (a subset hook caller holding that one plugin's
    implementations), so ``AIPLANE_TRACE_HOOKS`` and ``add_hookcall_monitoring``
    see it. One call for all would stop at the first observer that raises:
    pluggy runs the implementations in one loop, and a wrapper sees only the
    outcome of that loop, too late to let the others run.
    """
    caller = getattr(pm.hook, hook_name)
    # Pluggy calls the implementations from the end of the list (tryfirst ones first); keep its order.
    observers = list(dict.fromkeys(impl.plugin for impl in reversed(caller.get_hookimpls())))
    for plugin in observers:
        others = [p for p in pm.get_plugins() if p is not plugin]
        try:
            pm.subset_hook_caller(hook_name, others)(**kwargs)
        except Exception as exc:  # an observer's bug is logged; watching must not change the outcome
            log.warning(
                "observer %r failed in %s and was skipped: %s: %s", pm.get_name(plugin), hook_name, type(exc).__name__, exc
            )


@contextlib.contextmanager
def materialization(
    pm: pluggy.PluginManager, asset: str, run_id: str, inputs: list[Record], deployment: Deployment, region: str | None = None
) -> Iterator[dict[str, Any]]:
    """Wrap computing one asset (its partition ``region``, if partitioned) in the lifecycle hooks.

    Yields a dict; put the produced record under ``"output"`` before leaving
    the block so the after-hook sees it. Observers that raise are logged and
    skipped: watching a materialization must never change its outcome.
    """
    holder: dict[str, Any] = {}
    common = dict(asset=asset, run_id=run_id, inputs=inputs, deployment=deployment, region=region)
    _notify(pm, "aiplane_before_materialize", **common)
    try:
        yield holder
        if "output" not in holder:
            raise RuntimeError(f"materialization of {asset} finished without an output record")
    except BaseException as exc:  # a cancel or interrupt too is an error the observers hear of; re-raised
        _notify(pm, "aiplane_on_materialize_error", **common, error=exc)
        raise
    _notify(pm, "aiplane_after_materialize", **common, output=holder["output"])


def notify_error(
    pm: pluggy.PluginManager, asset: str, run_id: str, error: BaseException, deployment: Deployment, region: str | None = None
) -> None:
    """Tell the observers that computing ``asset`` in ``run_id`` failed, outside a :func:`materialization` block.

    For failures found after the fact: a run whose process died never reached its
    on-error hooks. Observers are isolated exactly as in :func:`materialization`.
    """
    _notify(
        pm, "aiplane_on_materialize_error",
        asset=asset, run_id=run_id, inputs=[], deployment=deployment, error=error, region=region,
    )
