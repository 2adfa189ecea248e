"""Errors that tell the user what was wrong and what to do about it."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

__all__ = [
    "AiplaneError",
    "ConfigError",
    "PluginError",
    "PlacementError",
    "WorkloadError",
    "WorkloadCancelled",
    "InputError",
    "GovernanceError",
    "unknown_name",
    "validation_problems",
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


class GovernanceError(AiplaneError):
    """An adapter did not pass the deployment's governance gate, so it is not served."""


class WorkloadError(AiplaneError):
    """A workload failed on its engine."""


class WorkloadCancelled(WorkloadError):
    """A workload was cancelled before it finished."""


def unknown_name(kind: str, name: str, known: Iterable[str], hint: str = "", known_as: str = "installed") -> str:
    """Message for an unknown name: lists what exists and suggests the closest match.

    >>> unknown_name("engine", "rya", ["local", "ray", "kfp"])
    "Unknown engine 'rya'; installed engines: kfp, local, ray. Did you mean 'ray'?"
    """
    known = sorted(set(known))
    msg = f"Unknown {kind} {name!r}; {known_as} {kind}s: {', '.join(known) if known else '(none)'}."
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    if close:
        msg += f" Did you mean {close[0]!r}?"
    if hint:
        msg += f" {hint}"
    return msg


def _keys(model: type[BaseModel]) -> dict[str, str]:
    """The keys a pydantic model accepts (a field's alias where it has one), each with its field name."""
    return {(field.alias or name): name for name, field in model.model_fields.items()}


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the key at the end of ``loc``, if there is one."""
    holder: Any = model  # a field's annotation: a model, a generic alias over one, or any other type
    for part in loc[:-1]:
        fields = getattr(holder, "model_fields", None)
        if fields is None:
            return None
        name = _keys(holder).get(part) if isinstance(part, str) else None
        if name is None:
            continue  # an index or dict key: stay on the item type found below
        holder = fields[name].annotation
        while typing.get_origin(holder) is not None:  # tuple[Target, ...], list[X], X | None
            args = [a for a in typing.get_args(holder) if a is not type(None) and a is not Ellipsis]
            holder = args[-1] if args else None
    return typing.cast("type[BaseModel]", holder) if hasattr(holder, "model_fields") else None


def validation_problems(exc: ValidationError, model: type[BaseModel], key_word: str = "key") -> list[str]:
    """One line per pydantic error: where, what is wrong and what is allowed there.

    ``exc`` is a ``pydantic.ValidationError`` raised validating ``model``;
    ``key_word`` is what an unknown key is called in the message (``key``, ``setting``).
    """
    errors = exc.errors()
    item_errors = {e["loc"][:1] for e in errors if len(e["loc"]) > 1}
    lines = []
    for err in errors:
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "too_short" and loc[:1] in item_errors:
            continue  # the bad items are reported themselves
        if err["type"] == "extra_forbidden":
            holder = _model_at(model, loc)
            allowed = sorted(_keys(holder)) if holder else []
            lines.append(f"{where}: {unknown_name(key_word, str(loc[-1]), allowed, known_as='allowed')}")
            continue
        got = f" (got {err['input']!r})" if err["type"] in ("literal_error", "enum") else ""
        # A validator's own ValueError is already written for the user: drop pydantic's "Value error, ".
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" and "error" in err.get("ctx", {}) else err["msg"]
        lines.append(f"{where}: {msg}{got}")
    return lines
