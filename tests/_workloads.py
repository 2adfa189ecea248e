"""Workload entry points used by the engine tests (imported in the workload subprocess)."""

import os
import time

from aiplane.core.errors import InputError
from aiplane.core.records import FactsheetRecord


def echo(ctx):
    for i in range(3):
        ctx.log(f"line {i}")
        ctx.metric("progress", i, step=i)
    ctx.metrics["pid"] = os.getpid()
    return {"out": FactsheetRecord(uri=f"/tmp/{ctx.params['name']}", digest="sha256:00", publisher="test", page_uri="")}


def sleep_forever(ctx):
    ctx.log(f"sleeping in {os.getpid()}")
    while True:
        time.sleep(0.1)
        ctx.check_cancelled()


def bad_input(ctx):
    raise InputError("training set is empty: no rows with split == 'train'")


def crash(ctx):
    print("about to crash", flush=True)
    os._exit(3)


def noisy_bytes(ctx):
    import sys

    sys.stdout.buffer.write(b"latin-1 \xe9\xff bytes\n")
    sys.stdout.flush()
    ctx.log("still talking")
    return {}


def leaves_a_child(ctx):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ctx.log(f"child {child.pid}")
    return {}


def buggy(ctx):
    return {}["input_ids"]
