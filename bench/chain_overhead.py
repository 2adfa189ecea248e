"""Benchmark: the whole chain through aiplane vs a bare script doing the same work.

Both sides use the same base model directory (built once, before timing), the
same sample tickets, the same trainer settings and the same LoRA training
function, and both start the same KServe server and wait for its readiness.
The bare side calls everything directly in one process: no Dagster, no
workload subprocesses, no placement, no lineage hooks, no factsheet page. The
ratio is therefore what aiplane's orchestration costs on top of the work.

    .venv/bin/python bench/chain_overhead.py [--steps N] [--rounds R] [--prestart]

Library imports are outside both clocks: the bare side's process has torch,
transformers, peft, pyarrow and pyiceberg imported before its clock starts, and
so has the Dagster process of the aiplane side. aiplane's workload processes
start on the clock, so the training worker's own imports of torch and
transformers count as overhead. ``--prestart`` starts that worker before the
clock (``LocalEngine.prestart``), as ``aiplane up`` can while it checks the
deployment, and measures what is left.

A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _deployment(home: Path, steps: int) -> Path:
    raw = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    raw["trainer"]["settings"]["max_steps"] = steps
    path = home / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _shared_model(cache: Path) -> Path:
    from aiplane.plugins.peft.base_model import build_tiny_granite

    return build_tiny_granite(cache / "tiny-granite")


def _local(uri: str) -> str:
    """The path of a local artifact URI (``file:///abs/path`` or a plain path)."""
    return urllib.parse.urlparse(uri).path if uri.startswith("file://") else uri


TRAIN_ENTRYPOINT = "aiplane.plugins.peft.train:run"
TRAIN_PRELOAD = ("pyarrow.dataset", "pyiceberg.catalog.sql", "torch", "transformers.modeling_utils", "peft")
"""What the training workload imports before it trains: the feature store's reader and the model's libraries."""


def run_aiplane(home: Path, model_dir: Path, steps: int, prestart: bool = False) -> float:
    import dagster as dg

    # The libraries this process uses for the work itself are imported before the clock starts,
    # as run_bare imports them before its clock: what is timed is the work and the orchestration.
    import pyarrow  # noqa: F401
    from pyiceberg.catalog.sql import SqlCatalog  # noqa: F401

    from aiplane.assets import ASSETS, AiplaneResource
    from aiplane.core.plugins import Registry

    (home / "models").mkdir(parents=True)
    os.symlink(model_dir, home / "models" / "tiny-granite")
    resource = AiplaneResource(deployment=str(_deployment(home, steps)), home=str(home))
    if prestart:
        Registry().engine("local").prestart(TRAIN_ENTRYPOINT, preload=TRAIN_PRELOAD, wait_s=300)
    started = time.perf_counter()
    result = dg.materialize(ASSETS, instance=dg.DagsterInstance.ephemeral(), resources={"aiplane": resource})
    elapsed = time.perf_counter() - started
    endpoint = result.asset_value("served_endpoint")
    settings = resource.config.serving.settings
    Registry().create("serving target", "kserve-local", settings).stop(endpoint)
    return elapsed


def run_bare(home: Path, model_dir: Path, steps: int) -> float:
    import peft  # noqa: F401  (train() imports it; imported here so the clock does not count it)
    import pyarrow as pa
    from pyiceberg.catalog.sql import SqlCatalog

    from aiplane.core.artifacts import sha256_path
    from aiplane.core.records import BaseModelRecord, FeaturesRecord
    from aiplane.core.sample import generate_tickets, to_features
    from aiplane.core.workload import Workload, WorkloadContext
    from aiplane.plugins.peft.train import train

    settings = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())["trainer"]["settings"]
    settings["max_steps"] = steps
    started = time.perf_counter()

    # Features: write the table, read it back at its snapshot.
    (home / "warehouse").mkdir(parents=True)
    catalog = SqlCatalog("bare", uri=f"sqlite:///{home}/catalog.db", warehouse=f"file://{home}/warehouse")
    catalog.create_namespace("bench")
    rows = pa.Table.from_pylist(to_features(generate_tickets()))
    table = catalog.create_table("bench.features", schema=rows.schema)
    table.append(rows)
    snapshot = table.current_snapshot().snapshot_id
    rows = table.scan(snapshot_id=snapshot).to_arrow().to_pylist()

    # Training: the same function, called in this process.
    base = BaseModelRecord(uri=str(model_dir), digest=sha256_path(model_dir), name="tiny", architecture="GraniteForCausalLM", parameters=0)
    features = FeaturesRecord(
        uri="bare", digest=f"iceberg-snapshot:{snapshot}", table="bench.features", snapshot_id=snapshot,
        row_count=len(rows), columns=tuple(rows[0]), residency=("eu",),
    )  # fmt: skip
    quiet = WorkloadContext(Workload(name="bare", entrypoint="bare:train"), emit=lambda event: None)
    adapter = train(base, features, rows, settings, str(home / "artifacts"), quiet)

    # Serving: the same server, started directly; wait until it answers.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiplane.plugins.kserve.server", "--base-model", str(model_dir), "--adapter", _local(adapter.uri),
         "--model-name", "bare", "--port", str(port), "--socket-fd", str(sock.fileno())],
        pass_fds=(sock.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    sock.close()
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/bare/ready", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("bare server died") from None
                time.sleep(0.2)
        # Factsheet: just the JSON.
        (home / "factsheet.json").write_text(json.dumps({"adapter": adapter.digest, "metrics": adapter.metrics}))
        return time.perf_counter() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps (local.yaml uses 150)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of each side")
    parser.add_argument(
        "--prestart", action="store_true", help="start aiplane's training worker (and its imports) before the clock"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aiplane-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = _shared_model(tmp / "cache")
        times: dict[str, list[float]] = {"aiplane": [], "bare": []}
        for r in range(args.rounds):
            order = ("aiplane", "bare") if r % 2 == 0 else ("bare", "aiplane")
            for side in order:
                home = tmp / f"{side}-{r}"
                if side == "aiplane":
                    times[side].append(run_aiplane(home, model_dir, args.steps, args.prestart))
                else:
                    times[side].append(run_bare(home, model_dir, args.steps))
                print(f"round {r + 1} {side:8} {times[side][-1]:7.2f} s", flush=True)
    a, b = min(times["aiplane"]), min(times["bare"])
    prestarted = ", training worker prestarted" if args.prestart else ""
    print(f"\nwhole chain, {args.steps} training steps, best of {args.rounds}{prestarted}:")
    print(f"  aiplane (Dagster + workloads) {a:7.2f} s")
    print(f"  bare script                   {b:7.2f} s")
    print(f"  ratio aiplane / bare          {a / b:7.2f}x  (overhead {a - b:+.2f} s)")


if __name__ == "__main__":
    main()
