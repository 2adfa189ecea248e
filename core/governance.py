"""The governance gate: what an adapter must show before it serves.

A deployment states it (``governance:`` in the deployment file, see
:class:`~aiplane.core.config.GovernanceSettings`): bounds on training metrics and
facts that must be on record. :func:`judge` holds a *draft* factsheet (built from
the adapter's lineage before it serves, :func:`~aiplane.core.factsheet.build_factsheet`)
to it. It fails closed: a metric the adapter does not have, or a fact that is
missing or empty, fails the gate just as a value out of bounds does.

Pure: no I/O, so the assets judge twice at no cost, once as a blocking check
right after training and again where the endpoint would be promoted.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from .config import GovernanceSettings

__all__ = ["Verdict", "judge", "unproduced_metrics"]

_MISSING = object()


@dataclass(frozen=True)
class Verdict:
    """What the gate decided, one entry per rule, each with what was found."""

    passed: bool
    rules: tuple[dict[str, Any], ...]

    @property
    def problems(self) -> list[str]:
        return [rule["why"] for rule in self.rules if not rule["passed"]]

    def summary(self) -> str:
        if not self.rules:
            return "no governance gate configured"
        if self.passed:
            return f"governance gate passed ({len(self.rules)} rule{'s' if len(self.rules) != 1 else ''})"
        return "governance gate failed: " + "; ".join(self.problems)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "rules": [dict(rule) for rule in self.rules]}


def judge(policy: GovernanceSettings, draft: Mapping[str, Any]) -> Verdict:
    """Hold the draft factsheet of an adapter to ``policy``; every rule is reported, passed or not."""
    metrics = (draft.get("training") or {}).get("metrics") or {}
    rules: list[dict[str, Any]] = []
    for name, bound in sorted(policy.thresholds.items()):
        value = metrics.get(name)
        rule: dict[str, Any] = {"rule": f"metric {name}", "min": bound.min, "max": bound.max, "value": value}
        if name not in metrics:
            known = ", ".join(sorted(k for k, v in metrics.items() if _number(v))) or "none"
            rule.update(passed=False, why=f"the adapter has no metric {name!r} (it has: {known})")
        elif not _number(value):
            rule.update(passed=False, why=f"{name} is not a number ({value!r})")
        elif bound.min is not None and value < bound.min:
            rule.update(passed=False, why=f"{name} {value:g} is below the minimum {bound.min:g}")
        elif bound.max is not None and value > bound.max:
            rule.update(passed=False, why=f"{name} {value:g} is above the maximum {bound.max:g}")
        else:
            rule.update(passed=True, why=f"{name} {value:g} is within bounds")
        rules.append(rule)
    for path in policy.required_facts:
        value = _lookup(draft, path)
        present = value is not _MISSING and value is not None and value != "" and value != [] and value != {}
        rules.append(
            {
                "rule": f"fact {path}",
                "passed": present,
                "why": f"fact {path} is on record" if present else f"fact {path} is missing or empty in the factsheet",
            }
        )
    return Verdict(passed=all(rule["passed"] for rule in rules), rules=tuple(rules))


def unproduced_metrics(policy: GovernanceSettings, produced: Collection[str]) -> list[str]:
    """One line per threshold, or ``training.metrics.*`` fact, naming a metric not in ``produced``.

    What the preflight says before training: the gate would fail every adapter
    on it, so what to change is the policy (or the trainer's settings), not the data.
    """
    wanted = [(f"governance.thresholds.{name}", name) for name in policy.thresholds]
    prefix = "training.metrics."
    wanted += [(f"governance.required_facts: {path}", path[len(prefix):]) for path in policy.required_facts if path.startswith(prefix)]
    problems = []
    for where, name in wanted:
        if name in produced:
            continue
        close = difflib.get_close_matches(name, sorted(produced), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        problems.append(
            f"{where}: the trainer does not produce a metric {name!r}, so every adapter would fail the gate.{hint} "
            f"It produces: {', '.join(sorted(produced)) or '(none)'}; name one of them, or change the trainer's "
            "settings so it produces this one."
        )
    return problems


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _lookup(document: Mapping[str, Any], path: str) -> Any:
    node: Any = document
    for key in path.split("."):
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return _MISSING
    return node
