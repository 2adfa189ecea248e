"""What every check shares: the failure it raises, the settings promises, a watch on writes, running a workload."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from aiplane.core.components import Component
from aiplane.core.errors import ConfigError
from aiplane.core.processes import follow_process, start_process, workload_dir
from aiplane.core.workload import Workload, WorkloadResult, parse_event, read_result

C = TypeVar("C", bound=Component[Any])

__all__ = ["ConformanceError", "Broken", "check_settings", "check_check", "Writes", "run_workload"]


class ConformanceError(AssertionError):
    """A promise of the plugin contract that the component under test broke; the message says which."""


class Broken:
    """Raises :class:`ConformanceError` prefixed with the component's kind and name."""

    def __init__(self, kind: str, name: str):
        self.prefix = f"{kind} {name!r}: "

    def __call__(self, message: str) -> ConformanceError:
        return ConformanceError(self.prefix + message)

    def require(self, condition: object, message: str) -> None:
        if not condition:
            raise self(message)


def check_settings(cls: type[C], base: type[Component[Any]], kind: str, settings: Mapping[str, Any] | None) -> C:
    """The class is a ``base`` with a name, takes ``settings`` and refuses a typo in them; an instance."""
    name = getattr(cls, "name", None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConformanceError(f"{cls!r} is not a subclass of aiplane.core.components.{base.__name__}")
    broken = Broken(kind, str(name))
    broken.require(isinstance(name, str) and name.strip(), "has no 'name' (the string a deployment file writes)")
    try:
        component = cls(dict(settings or {}))
    except ConfigError as exc:
        raise broken(f"refused the settings the test gave it: {exc}") from None
    typo = (next(iter(settings), "") + "_typo") if settings else "conformance_typo"
    try:
        cls({**dict(settings or {}), typo: 1})
    except ConfigError as exc:
        broken.require(typo in str(exc), f"settings typo {typo!r} refused without naming the key: {exc}")
    else:
        raise broken(f"settings typo {typo!r} not refused (a typo must fail at load time with the key named)")
    return component


def check_check(component: Any, broken: Broken, tmp_path: Path, key: str, settings: Mapping[str, Any] | None, *args: Any) -> None:
    """``component.check()``, on a deployment whose ``key`` names it with ``settings``, gives a list of sentences and
    writes nothing under ``tmp_path``. ``args`` follow the deployment (a serving target's endpoint name)."""
    from .fixtures import sample_deployment

    writes = Writes([tmp_path])
    problems = component.check(sample_deployment(tmp_path, key, component.name, dict(settings or {})), *args)
    broken.require(isinstance(problems, list) and all(isinstance(p, str) for p in problems), "check() must return a list of sentences")
    broken.require(not writes.changed(), f"check() must not write anything; it wrote {writes.changed()[:3]}")


class Writes:
    """What exists under some directories, to tell whether a call wrote anything there."""

    def __init__(self, roots: Iterable[Path | str]):
        self.roots = [Path(r) for r in roots]
        self.before = self._scan()

    def _scan(self) -> dict[str, tuple[int, int]]:
        seen: dict[str, tuple[int, int]] = {}
        for root in self.roots:
            for folder, dirs, files in os.walk(root):
                for entry in (*dirs, *files):
                    path = os.path.join(folder, entry)
                    try:
                        st = os.lstat(path)
                    except FileNotFoundError:
                        continue
                    seen[path] = (st.st_mtime_ns, st.st_size)
        return seen

    def changed(self) -> list[str]:
        after = self._scan()
        return sorted(p for p in set(after) | set(self.before) if after.get(p) != self.before.get(p))


def run_workload(workload: Workload, engine: Any = None, target: Any = None, timeout_s: float = 600) -> WorkloadResult:
    """Run ``workload`` as an engine would: with ``engine`` if given, else in a fresh ``python -m aiplane.core.worker``
    process in its own session, whose process group is ended when it returns (as the ``local`` engine does)."""
    shipped = Workload.model_validate_json(workload.model_dump_json())
    if shipped != workload:
        raise ConformanceError(f"workload {workload.name!r} does not survive JSON (engines ship it as JSON)")
    if engine is not None:
        from .fixtures import conformance_target

        return engine.run(workload, target or conformance_target(engine.name), lambda event: None)
    cancel = threading.Event()
    timer = threading.Timer(timeout_s, cancel.set)
    timer.start()
    lines: list[str] = []
    try:
        with workload_dir(workload.name) as tmp:
            spec, result = Path(tmp, "workload.json"), Path(tmp, "result.json")
            spec.write_text(workload.model_dump_json())
            proc = start_process([sys.executable, "-m", "aiplane.core.worker", str(spec), str(result)])
            follow_process(proc, lambda line: lines.append(parse_event(line).message), cancel, what=workload.name)
            if not result.exists():
                raise ConformanceError(f"workload {workload.name!r} ended with no result:\n" + "\n".join(lines[-30:]))
            return read_result(result, workload)
    finally:
        timer.cancel()
