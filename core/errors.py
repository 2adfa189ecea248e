"""Errors that tell the user what was wrong and what to do about it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "AiplaneError",
    "ConfigError",
    "PluginError",
    "PlacementError",
    "WorkloadError",
    "WorkloadCancelled",
    "InputError",
    "unknown_name",
]


class AiplaneError(Exception):
    """Base class of every error aiplane raises on purpose."""


class ConfigError(AiplaneError):
    """A deployment file or plugin setting is wrong."""


class PluginError(AiplaneError):
    """A plugin or a component it provides is missing or broken."""


class PlacementError(AiplaneError):
    """No execution target satisfies a workload's requirements."""


class InputError(AiplaneError):
    """An input record or the data it points to is not usable."""


class WorkloadError(AiplaneError):
    """A workload failed on its engine."""


class WorkloadCancelled(WorkloadError):
    """A workload was cancelled before it finished."""


def unknown_name(kind: str, name: str, known: Iterable[str], hint: str = "") -> str:
    """Message for an unknown name: lists what exists and suggests the closest match.

    >>> unknown_name("engine", "rya", ["local", "ray", "kfp"])
    "Unknown engine 'rya'; installed engines: kfp, local, ray. Did you mean 'ray'?"
    """
    known = sorted(set(known))
    msg = f"Unknown {kind} {name!r}; installed {kind}s: {', '.join(known) if known else '(none)'}."
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    if close:
        msg += f" Did you mean {close[0]!r}?"
    if hint:
        msg += f" {hint}"
    return msg
