"""``python -m aiplane.core.worker SPEC.json RESULT.json``: how engines run a workload out of process.

``python -m aiplane.core.worker --standby --preload torch,transformers`` starts a
worker before its workload exists: it imports the given modules, then waits for
one line on stdin, ``{"spec": SPEC, "result": RESULT}``, and runs that workload
as above (EOF instead: it exits). The local engine's ``prestart`` uses it.

Progress events go to stdout, one line each (see :func:`aiplane.core.workload.format_event`);
the result, or the error, goes to RESULT.json for :func:`aiplane.core.workload.read_result`.
Kept apart from :mod:`aiplane.core.workload` so ``-m`` does not import that module twice.

Once RESULT is written the process leaves without tearing the interpreter down
(see :func:`exit_now`): freeing every object of torch, transformers and sympy
one by one takes a second or more, and the engine waits for the process to end.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import NoReturn

from .errors import AiplaneError, WorkloadCancelled
from .workload import Event, Workload, execute, format_event

__all__ = ["main", "exit_now", "preload"]


def main(argv: list[str] | None = None) -> int:
    """Run the workload in SPEC, streaming events to stdout, and write RESULT."""
    parser = argparse.ArgumentParser(prog="python -m aiplane.core.worker")
    parser.add_argument("spec", type=Path, nargs="?", help="workload JSON")
    parser.add_argument("result", type=Path, nargs="?", help="where to write the result JSON")
    parser.add_argument(
        "--standby", action="store_true", help="import --preload, then read the SPEC and RESULT paths from stdin"
    )
    parser.add_argument("--preload", default="", help="comma-separated modules to import while on standby")
    parser.add_argument("--ready-fd", type=int, default=None, help="on standby: close this fd once imported")
    args = parser.parse_args(argv)
    if args.standby:
        handoff = _stand_by(args.preload, args.ready_fd)
        if handoff is None:
            return 0
        args.spec, args.result = handoff
    elif args.spec is None or args.result is None:
        parser.error("SPEC and RESULT are required, unless --standby")
    workload = Workload.model_validate_json(args.spec.read_text())

    def emit(event: Event) -> None:
        print(format_event(event), flush=True)

    returned = threading.Event()

    def cancelled(signum: int, frame: FrameType | None) -> None:
        if returned.is_set():
            # Too late to undo: the entry point did its work (a deploy started and recorded its server), so the
            # result is written and delivered; a cancel raised now would leave that work with no record of it.
            return
        # Raise instead of dying so `finally` blocks (staging clean-up) run before the engine's SIGKILL.
        raise WorkloadCancelled(f"workload {workload.name} ({workload.run_id}) was cancelled (signal {signum})")

    signal.signal(signal.SIGTERM, cancelled)
    try:
        result = execute(workload, emit, on_return=returned.set)
    except Exception as exc:  # the engine re-raises it from the result file
        if isinstance(exc, AiplaneError):
            message = str(exc)  # written to be read: no traceback needed
        else:
            # A bug somewhere: keep the traceback in the run log and the type in the message.
            for line in traceback.format_exc().rstrip().splitlines():
                emit(Event(type="log", message=line))
            message = f"{type(exc).__name__}: {exc}"
        _write_result(args.result, json.dumps({"error_type": type(exc).__name__, "error": message}))
        emit(Event(type="log", message=f"workload failed: {type(exc).__name__}: {exc}"))
        return 1
    _write_result(args.result, result.model_dump_json())
    return 0


def _write_result(path: Path, text: str) -> None:
    """Whole or not at all: a SIGKILL while writing leaves no half a result for the engine to misread."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _stand_by(modules: str, ready_fd: int | None) -> tuple[Path, Path] | None:
    """Import what the coming workload needs, then wait for it: (SPEC, RESULT), or ``None`` on EOF."""
    preload(filter(None, (n.strip() for n in modules.split(","))))
    if ready_fd is not None:
        os.close(ready_fd)  # the engine sees EOF: imported
    line = sys.stdin.readline()
    # The workload's stdin is empty, as a worker started for it has /dev/null.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if not line.strip():
        return None  # the engine let this standby go, or is gone itself
    handoff = json.loads(line)
    return Path(handoff["spec"]), Path(handoff["result"])


def preload(modules: Iterable[str]) -> None:
    """Import ``modules`` ahead of a workload that needs them (a standby's wait); one that fails to import is
    skipped: the workload imports it again and reports the failure where it belongs."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # any import failure, as above
            pass


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` as a normal exit would, less the interpreter's teardown.

    Non-daemon threads are waited for and ``atexit`` handlers run (temporary
    directories, log handlers, thread pools are cleaned up as usual), the standard
    streams are flushed, then :func:`os._exit` skips freeing each module's objects,
    which the operating system does at once. Only for a process whose work is done.
    """
    # The result is written: a SIGTERM from here on may end the process, not raise into the clean-up.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:  # an interpreter without it: take the ordinary way out
        sys.exit(code)
    shutdown()  # what Py_Finalize does first: thread-pool exit hooks, then join non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
