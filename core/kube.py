"""Kubernetes vocabulary the plugins that create pods share: quantities, tolerations, GPUs per pod.

Pure functions and pydantic models, no Kubernetes client: a deployment's settings
are checked against the API server's grammars when it loads, before any call.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Target
    from .workload import Workload

__all__ = ["Toleration", "check_cpu", "check_memory", "cpu_quantity", "memory_quantity", "pod_gpus"]

# The API server's quantity grammars (what kfp's PipelineTask applies too).
_CPU = re.compile(r"^([0-9]*[.])?[0-9]+m?$")
_MEMORY = re.compile(r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")


class Toleration(BaseModel):
    """A Kubernetes toleration for a workload's pod."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    def manifest(self) -> dict[str, str | int]:
        """As a pod spec writes it: camelCase, unset fields left out."""
        fields = {"key": self.key, "operator": self.operator, "value": self.value, "effect": self.effect,
                  "tolerationSeconds": self.toleration_seconds}  # fmt: skip
        return {k: v for k, v in fields.items() if v is not None}


def check_cpu(value: str | None, field: str) -> str | None:
    """``value`` if it is a CPU quantity; for a settings validator (ValueError names ``field``)."""
    if value is not None and not _CPU.match(value):
        raise ValueError(f"{field} {value!r} is not a CPU quantity; write e.g. '2', '0.5' or '500m'")
    return value


def check_memory(value: str | None, field: str) -> str | None:
    """``value`` if it is a memory quantity; for a settings validator (ValueError names ``field``)."""
    if value is not None and not _MEMORY.match(value):
        raise ValueError(f"{field} {value!r} is not a memory quantity; write an integer with a unit, e.g. '8Gi'")
    return value


def cpu_quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def memory_quantity(gb: float) -> str:
    return f"{int(gb)}G" if float(gb).is_integer() else f"{round(gb * 1024)}Mi"


def pod_gpus(workload: "Workload", target: "Target") -> int:
    """GPUs for the workload's pod on ``target``; ConfigError if it asks for more than the target has."""
    wanted = workload.resources.gpus
    if wanted > target.gpus:
        raise ConfigError(
            f"Workload {workload.name} asks for {wanted} GPU(s) but target {target.name!r} has {target.gpus}; "
            "raise the target's gpus or run the workload on a GPU target."
        )
    # A trainer placed on a GPU target by the deployment's `gpus:` gets the target's GPUs.
    return wanted or target.gpus
