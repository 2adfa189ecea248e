"""Workload entry points for tests/test_worker_exit.py and tests/test_prestart.py (run in the worker subprocess)."""

import atexit
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def leaves_work_for_exit(ctx):
    """Leave what an ordinary interpreter exit takes care of: an atexit hook, a running thread, a temp dir, a pool."""
    out = Path(ctx.params["dir"])
    atexit.register(lambda: (out / "atexit").write_text("ran"))

    def later():
        time.sleep(0.5)
        (out / "thread").write_text("ran")

    threading.Thread(target=later).start()  # not a daemon: exit waits for it
    left = tempfile.TemporaryDirectory(prefix="aiplane-test-exit-")  # removed by its finalizer at exit
    (out / "tmpdir").write_text(left.name)
    ctx.pool = ThreadPoolExecutor(max_workers=1)  # idle worker thread, never shut down
    ctx.pool.submit(lambda: None).result()
    ctx._left = left
    return {}


def where_am_i(ctx):
    """Report this process, its stdin and whether the modules named in params were imported before it ran."""
    import os
    import sys

    from aiplane.core.records import FactsheetRecord

    ctx.metrics["pid"] = os.getpid()
    ctx.metrics["preloaded"] = [m for m in ctx.params.get("modules", []) if m in sys.modules]
    ctx.metrics["stdin"] = sys.stdin.read()
    ctx.log(f"running in {os.getpid()}")
    return {"out": FactsheetRecord(uri="/tmp/x", digest="sha256:00", publisher="test", page_uri="")}


def cancelled_once_it_returned(ctx):
    """Return, then be sent a SIGTERM (a cancel) while the worker writes the result: from a metric's serializer."""
    import os
    import signal

    from pydantic import BaseModel, model_serializer

    from aiplane.core.records import FactsheetRecord

    class CancelsWhileWritten(BaseModel):
        @model_serializer
        def written(self) -> str:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the signal's handler runs in here
            return "delivered"

    ctx.metrics["late"] = CancelsWhileWritten()
    return {"out": FactsheetRecord(uri="/tmp/x", digest="sha256:00", publisher="test", page_uri="")}
