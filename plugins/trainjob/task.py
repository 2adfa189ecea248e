"""``python -m aiplane.plugins.trainjob.task``: what each node of a ``trainjob`` engine's TrainJob runs.

The pod's environment carries the workload (``AIPLANE_WORKLOAD``) and where its
result goes (``AIPLANE_RESULT``), as on the ``k8s-job`` engine
(:func:`aiplane.core.kube.run_pod_task`). One process: the workload runs as on
every engine. Several (``num_nodes`` x ``num_proc_per_node``): the container runs
this module under ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and the rendezvous address from the Trainer's ``PET_*`` variables; each process
joins the ``torch.distributed`` process group (NCCL on a GPU, gloo otherwise)
before the workload starts, runs it as its rank, and only rank 0's result is
written.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from aiplane.core.errors import AiplaneError
from aiplane.core.kube import run_pod_task
from aiplane.core.workload import Event, Runtime, Workload, execute, format_event

__all__ = ["main", "RankRuntime"]


class RankRuntime(Runtime):
    """One process of a TrainJob: its rank and the world size torchrun gave it; no checkpoints kept."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size


def main() -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return run_pod_task()
    rank = int(os.environ["RANK"])
    return run_pod_task(_as_rank(rank, world), write_result=rank == 0)


def _as_rank(rank: int, world: int) -> Callable[[Path, Path], int]:
    def run(spec_file: Path, result_file: Path) -> int:
        import torch
        import torch.distributed as dist

        workload = Workload.model_validate_json(spec_file.read_text())

        def emit(event: Event) -> None:
            print(format_event(event), flush=True)

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            result = execute(workload, emit, runtime=RankRuntime(rank, world))
        except Exception as exc:  # written as the worker writes it, so the engine raises it as its own class
            if not isinstance(exc, AiplaneError):
                for line in traceback.format_exc().rstrip().splitlines():
                    emit(Event(type="log", message=line))
            message = str(exc) if isinstance(exc, AiplaneError) else f"{type(exc).__name__}: {exc}"
            result_file.write_text(json.dumps({"error_type": type(exc).__name__, "error": message}))
            emit(Event(type="log", message=f"rank {rank}: workload failed: {type(exc).__name__}: {exc}"))
            return 1
        finally:
            dist.destroy_process_group()
        result_file.write_text(result.model_dump_json())
        return 0

    return run


if __name__ == "__main__":
    sys.exit(main())
