"""``python -m aiplane.plugins.k8s.task``: what the ``k8s-job`` engine's container runs.

The Job's pod carries the workload in its environment: ``AIPLANE_WORKLOAD`` (the
workload's JSON) and ``AIPLANE_RESULT`` (where the result goes: an object-storage
URI, written with the workload's own storage settings, or a path on a volume the
orchestrator mounts too). The workload runs through :mod:`aiplane.core.worker`,
as on every engine: its events go to stdout, which is the pod's log the engine
follows. On failure the error also goes to the container's termination message
(``/dev/termination-log``), so ``kubectl describe`` and the engine show it even
when the result cannot be written.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["main"]

WORKLOAD_ENV = "AIPLANE_WORKLOAD"
RESULT_ENV = "AIPLANE_RESULT"
TERMINATION_ENV = "AIPLANE_TERMINATION_MESSAGE_PATH"
"""Where the termination message goes; the pod spec's ``terminationMessagePath`` (default ``/dev/termination-log``)."""
_TERMINATION_LIMIT = 4096  # what the kubelet keeps of a termination message


def main() -> int:
    from aiplane.core import worker
    from aiplane.core.storage import is_local, local_path
    from aiplane.core.workload import Workload

    try:
        spec, result_uri = os.environ[WORKLOAD_ENV], os.environ[RESULT_ENV]
    except KeyError as exc:
        return _fail(f"ConfigError: {exc.args[0]} is not set; this module runs inside a k8s-job engine pod")
    workload = Workload.model_validate_json(spec)
    with tempfile.TemporaryDirectory(prefix="aiplane-task-") as tmp:
        spec_file, result_file = Path(tmp, "workload.json"), Path(tmp, "result.json")
        spec_file.write_text(spec)
        code = worker.main([str(spec_file), str(result_file)])
        text = result_file.read_text() if result_file.exists() else json.dumps(
            {"error_type": "WorkloadError", "error": "the worker wrote no result"}
        )
    message = ""
    if code != 0:
        failure = json.loads(text)
        message = f"{failure.get('error_type', 'WorkloadError')}: {failure.get('error', '')}"
    try:
        if is_local(result_uri):
            local_path(result_uri).parent.mkdir(parents=True, exist_ok=True)
        workload.storage().write_bytes(result_uri, text.encode())
    except Exception as exc:  # the engine then reports the termination message instead
        message = f"{message + '; ' if message else ''}cannot write the result to {result_uri}: {type(exc).__name__}: {exc}"
        code = code or 1
    if message:
        _fail(message)
    return code


def _fail(message: str) -> int:
    print(message, file=sys.stderr, flush=True)
    path = os.environ.get(TERMINATION_ENV, "/dev/termination-log")
    try:
        with open(path, "w") as f:
            f.write(message[-_TERMINATION_LIMIT:])
    except OSError:
        pass  # no termination log outside a pod; stderr (the pod log) has it
    return 1


if __name__ == "__main__":
    sys.exit(main())
