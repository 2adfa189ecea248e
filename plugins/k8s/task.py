"""``python -m aiplane.plugins.k8s.task``: what the ``k8s-job`` engine's container runs.

The Job's pod carries the workload in its environment: ``AIPLANE_WORKLOAD`` (the
workload's JSON) and ``AIPLANE_RESULT`` (where the result goes: an object-storage
URI, written with the workload's own storage settings, or a path on a volume the
orchestrator mounts too). The workload runs through :mod:`aiplane.core.worker`,
as on every engine, by :func:`aiplane.core.kube.run_pod_task`: its events go to
stdout, which is the pod's log the engine follows, and a failure also goes to the
container's termination message.
"""

from __future__ import annotations

import sys

from aiplane.core.kube import RESULT_ENV, TERMINATION_ENV, WORKLOAD_ENV, run_pod_task

__all__ = ["main", "RESULT_ENV", "TERMINATION_ENV", "WORKLOAD_ENV"]


def main() -> int:
    return run_pod_task()


if __name__ == "__main__":
    sys.exit(main())
