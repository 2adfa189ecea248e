"""Per-task overhead of the ``kfp`` engine's local path (kfp.local) against the ``local`` engine.

Both engines run the same tiny workload (:func:`noop`) in the same process, alternating,
after one warm-up run each; the workload itself takes milliseconds, so the times are
the engines' overhead: starting interpreters, compiling the pipeline, kfp.local's
bookkeeping. As in a chain of tasks, each kfp.local run is handed the runner
process the previous one started when it ended (kfp and the aiplane worker imported),
which forks the task rather than starting an interpreter for it, and a workload
compiled before is not compiled again; the local engine starts its worker per run
(it prestarts only where ``aiplane up`` asks it to). Run from the repository root::

    .venv/bin/python bench/kfp_overhead.py [--runs 5]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def noop(ctx):
    """The benchmark workload: one event, one output record."""
    from aiplane.core.records import FactsheetRecord

    ctx.log("noop")
    return {"out": FactsheetRecord(uri="/dev/null", digest="sha256:00", publisher="bench", page_uri="")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per engine (after one warm-up each)")
    args = parser.parse_args()
    # The workload subprocesses import this module as `kfp_overhead`.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])

    from aiplane.core.config import Target
    from aiplane.core.plugins import Registry
    from aiplane.core.workload import Workload

    registry = Registry()
    with tempfile.TemporaryDirectory(prefix="aiplane-bench-kfp-") as root:
        engines = {
            "local": (registry.engine("local"), Target(name="local", engine="local", region="eu")),
            "kfp-local": (registry.engine("kfp", {"pipeline_root": root}), Target(name="kfp-local", engine="kfp", region="eu")),
        }
        times: dict[str, list[float]] = {name: [] for name in engines}
        compile_s: list[float] = []
        handed = 0
        for i in range(args.runs + 1):
            for name, (engine, target) in engines.items():
                workload = Workload(name="noop", entrypoint="kfp_overhead:noop")
                if name == "kfp-local":
                    t = time.perf_counter()
                    engine.compile(workload, target)
                    compile_s.append(time.perf_counter() - t)
                started = time.perf_counter()
                result = engine.run(workload, target, lambda event: None)
                elapsed = time.perf_counter() - started
                assert result.outputs["out"].publisher == "bench"
                if i > 0:  # the first round is the warm-up (imports, first compile)
                    times[name].append(elapsed)
                    if name == "kfp-local":
                        handed += bool(result.engine.get("prestarted"))
    local, kfp = statistics.median(times["local"]), statistics.median(times["kfp-local"])
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPU(s), {args.runs} timed runs per engine (median, min-max):")
    for name in engines:
        t = times[name]
        print(f"  {name:10s} {statistics.median(t):6.3f} s per task  ({min(t):.3f}-{max(t):.3f})")
    print(f"  kfp compile (in-process): first {compile_s[0]:.3f} s, then from the cache {statistics.median(compile_s[1:]):.4f} s")
    print(f"  kfp-local runs handed a runner started ahead: {handed} of {args.runs}")
    print(f"  kfp-local / local = {kfp / local:.2f}x; kfp.local adds {kfp - local:.3f} s per task")


if __name__ == "__main__":
    main()
