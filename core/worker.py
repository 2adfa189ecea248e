"""``python -m aiplane.core.worker SPEC.json RESULT.json``: how engines run a workload out of process.

Progress events go to stdout, one line each (see :func:`aiplane.core.workload.format_event`);
the result, or the error, goes to RESULT.json for :func:`aiplane.core.workload.read_result`.
Kept apart from :mod:`aiplane.core.workload` so ``-m`` does not import that module twice.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from pathlib import Path

from .errors import AiplaneError, WorkloadCancelled
from .workload import Event, Workload, execute, format_event

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the workload in SPEC, streaming events to stdout, and write RESULT."""
    parser = argparse.ArgumentParser(prog="python -m aiplane.core.worker")
    parser.add_argument("spec", type=Path, help="workload JSON")
    parser.add_argument("result", type=Path, help="where to write the result JSON")
    args = parser.parse_args(argv)
    workload = Workload.model_validate_json(args.spec.read_text())

    def emit(event: Event) -> None:
        print(format_event(event), flush=True)

    def cancelled(signum, frame):
        # Raise instead of dying so `finally` blocks (staging clean-up) run before the engine's SIGKILL.
        raise WorkloadCancelled(f"workload {workload.name} ({workload.run_id}) was cancelled (signal {signum})")

    signal.signal(signal.SIGTERM, cancelled)
    try:
        result = execute(workload, emit)
    except Exception as exc:  # the engine re-raises it from the result file
        if isinstance(exc, AiplaneError):
            message = str(exc)  # written to be read: no traceback needed
        else:
            # A bug somewhere: keep the traceback in the run log and the type in the message.
            for line in traceback.format_exc().rstrip().splitlines():
                emit(Event(type="log", message=line))
            message = f"{type(exc).__name__}: {exc}"
        args.result.write_text(json.dumps({"error_type": type(exc).__name__, "error": message}))
        emit(Event(type="log", message=f"workload failed: {type(exc).__name__}: {exc}"))
        return 1
    args.result.write_text(result.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
