"""The plugin manager: loads every plugin, built-in or third-party, through the ``aiplane`` entry points.

``AIPLANE_LOAD_PLUGINS=a,b`` loads only the named plugins; ``AIPLANE_DISABLE_PLUGINS=c``
skips the named ones. A plugin that fails to import or declares a hook aiplane
does not know is left out with a warning naming its distribution; the rest load.
``AIPLANE_TRACE_HOOKS=1`` logs every hook call.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .components import Component, Engine, FactsheetPublisher, FeatureStore, ServingTarget, Trainer
from .errors import PluginError, unknown_name

__all__ = ["get_plugin_manager", "Registry", "PluginInfo", "BrokenPlugin", "materialization"]

log = logging.getLogger("aiplane.plugins")
_trace = logging.getLogger("aiplane.hooks")
GROUP = hookspecs.PROJECT


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin as ``aiplane plugins`` lists it."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]


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


def _names(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def get_plugin_manager(entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh plugin manager with the hookspecs added and the installed plugins loaded."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    pm.aiplane_state = _Loaded()  # type: ignore[attr-defined]
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

    def before(name, impls, kwargs):
        trace.info("hook %s(%s) -> %s", name, ", ".join(kwargs), ", ".join(i.plugin_name for i in impls))

    def after(outcome, name, impls, kwargs):
        exc = outcome.exception
        trace.info("hook %s %s", name, f"raised {type(exc).__name__}: {exc}" if exc else "returned")

    pm.add_hookcall_monitoring(before, after)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allow, block = _names("AIPLANE_LOAD_PLUGINS"), _names("AIPLANE_DISABLE_PLUGINS") or set()
    state: _Loaded = pm.aiplane_state  # type: ignore[attr-defined]
    entry_points = sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name)
    available = {ep.name for ep in entry_points}
    for var, names in (("AIPLANE_LOAD_PLUGINS", allow or set()), ("AIPLANE_DISABLE_PLUGINS", block)):
        for name in sorted(names - available):
            log.warning("%s names %s", var, unknown_name("plugin", name, available))
    for ep in entry_points:
        if (allow is not None and ep.name not in allow) or ep.name in block:
            continue
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        dist = getattr(ep, "dist", None)
        dist_info = (dist.metadata["Name"], dist.version) if dist else (None, None)
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
    pm.aiplane_state.broken.append(broken)  # type: ignore[attr-defined]
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

_KINDS: dict[str, tuple[str, type[Component]]] = {
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

    def components(self, kind: str) -> dict[str, type[Component]]:
        hook_name, base = _KINDS[kind]
        found: dict[str, type[Component]] = {}
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

    def get(self, kind: str, name: str) -> type[Component]:
        found = self.components(kind)
        if name not in found:
            raise PluginError(unknown_name(kind, name, found, hint=self._broken_hint()))
        return found[name]

    def create(self, kind: str, name: str, settings: Any = None) -> Any:
        """An instance of the named component with validated settings."""
        return self.get(kind, name)(settings)

    def engine(self, name: str, settings: Any = None) -> Engine:
        return self.create("engine", name, settings)

    def validate(self, deployment) -> None:
        """Check that every component and engine a deployment names is installed and accepts its settings.

        Raises one :class:`ConfigError` listing every problem, naming the file and key.
        """
        from .errors import AiplaneError, ConfigError

        problems = []
        for key, kind in DEPLOYMENT_KINDS.items():
            spec = getattr(deployment, key)
            try:
                self.create(kind, spec.name, spec.settings)
            except AiplaneError as exc:
                problems.append(f"  {key}: {exc}")
        engines = self.components("engine")
        for i, target in enumerate(deployment.targets):
            if target.engine not in engines:
                problems.append(f"  targets[{i}].engine: " + unknown_name("engine", target.engine, engines))
            else:
                try:
                    engines[target.engine](target.settings)
                except AiplaneError as exc:
                    problems.append(f"  targets[{i}].settings: {exc}")
        plugins = [name for name, _ in self.pm.list_name_plugin()]
        for name in deployment.observers:
            if name not in plugins:
                problems.append(f"  observers.{name}: " + unknown_name("plugin", name, plugins))
        if problems:
            raise ConfigError(f"{deployment.source}: invalid deployment:\n" + "\n".join(problems))

    def _broken_hint(self) -> str:
        broken = self.pm.aiplane_state.broken  # type: ignore[attr-defined]
        if not broken:
            return ""
        return "Plugins that failed to load: " + ", ".join(f"{b.name} ({b.distribution})" for b in broken) + "."

    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin with its distribution, version and the hooks it implements."""
        state: _Loaded = self.pm.aiplane_state  # type: ignore[attr-defined]
        out = []
        for name, plugin in sorted(self.pm.list_name_plugin()):
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            dist, version = state.dists.get(name, (None, None))
            out.append(PluginInfo(name, dist, version, hooks))
        return out

    @property
    def broken(self) -> list[BrokenPlugin]:
        return list(self.pm.aiplane_state.broken)  # type: ignore[attr-defined]

    def resolve_base_model(self, uri: str, home: str):
        record = self.pm.hook.aiplane_resolve_base_model(uri=uri, home=home)
        if record is None:
            from .errors import InputError

            raise InputError(
                f"Base model {uri!r} not found: not a directory with a config.json and no plugin knows this URI. "
                "Give a local directory of a Hugging Face model (e.g. a download of "
                "ibm-granite/granite-3.3-2b-instruct) or 'builtin:tiny-granite'."
            )
        return record


def _notify(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> None:
    """Call every observer's implementation; one failing observer neither fails the asset nor silences the others."""
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        _trace.info("hook %s -> %s", hook_name, impl.plugin_name)
        try:
            impl.function(*(kwargs[arg] for arg in impl.argnames))
        except Exception as exc:
            log.warning("observer %r failed in %s and was skipped: %s: %s", impl.plugin_name, hook_name, type(exc).__name__, exc)


@contextlib.contextmanager
def materialization(pm: pluggy.PluginManager, asset: str, run_id: str, inputs: list, deployment) -> Iterator[dict]:
    """Wrap computing one asset in the lifecycle hooks.

    Yields a dict; put the produced record under ``"output"`` before leaving
    the block so the after-hook sees it. Observers that raise are logged and
    skipped: watching a materialization must never change its outcome.
    """
    holder: dict[str, Any] = {}
    common = dict(asset=asset, run_id=run_id, inputs=inputs, deployment=deployment)
    _notify(pm, "aiplane_before_materialize", **common)
    try:
        yield holder
        if "output" not in holder:
            raise RuntimeError(f"materialization of {asset} finished without an output record")
    except BaseException as exc:
        _notify(pm, "aiplane_on_materialize_error", **common, error=exc)
        raise
    _notify(pm, "aiplane_after_materialize", **common, output=holder["output"])
