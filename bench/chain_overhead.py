"""Benchmark: ``aiplane up`` vs a bare script doing the same work, each as the user runs it.

Both sides use the same base model directory (built once, before timing), the
same sample tickets, the same trainer settings and the same LoRA training
function; both start the same vLLM server, wait for its readiness and ask it
for one completion. The bare side is one Python process calling everything
directly: no Dagster, no workload subprocesses, no placement, no preflight, no
lineage hooks, no factsheet page. Each side is timed from starting its process
to having the endpoint up and the factsheet written, imports included (the bare
script imports torch, transformers, peft, pyarrow and pyiceberg; aiplane imports
Dagster, and its workers import what they need). The ratio is therefore what
aiplane's orchestration costs a user on top of the work.

    .venv/bin/python bench/chain_overhead.py [--steps N] [--rounds R]

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


def run_aiplane(home: Path, model_dir: Path, steps: int) -> float:
    """Seconds of ``aiplane up`` in a new process on a new home, until it exits; then stop the endpoint."""
    (home / "models").mkdir(parents=True)
    os.symlink(model_dir, home / "models" / "tiny-granite")
    deployment = _deployment(home, steps)
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"} | {"AIPLANE_HOME": str(home)}
    aiplane = [sys.executable, "-m", "aiplane.assets.cli", "--deployment", str(deployment)]
    started = time.perf_counter()
    done = subprocess.run([*aiplane, "up"], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    subprocess.run([*aiplane, "stop"], env=env, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"aiplane up failed:\n{done.stderr[-3000:]}")
    return elapsed


def run_bare(home: Path, model_dir: Path, steps: int) -> float:
    """Seconds of the bare script (:func:`bare`) in a new process, until it says it is done; then stop it."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--bare", str(home), str(model_dir), str(steps)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - started
    proc.stdin.close()  # the script stops its server and exits
    proc.wait(timeout=60)
    if line.strip() != "done":
        raise RuntimeError(f"the bare script failed (exit {proc.returncode})")
    return elapsed


def bare(home: Path, model_dir: Path, steps: int) -> None:
    """The same work as ``aiplane up``, directly, in this process; prints ``done``, then waits for stdin to close."""
    import pyarrow as pa
    from pyiceberg.catalog.sql import SqlCatalog

    from aiplane.core.artifacts import sha256_path
    from aiplane.core.records import BaseModelRecord, FeaturesRecord
    from aiplane.core.sample import generate_tickets, to_features
    from aiplane.core.workload import Workload, WorkloadContext
    from aiplane.plugins.peft.train import train

    settings = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())["trainer"]["settings"]
    settings["max_steps"] = steps

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
    # Training on all cores, torch's own default, as a hand-written script gets it: the script trains alone.
    # (aiplane's loop leaves one core to what runs beside it: see aiplane.plugins.peft.train.cpu_threads.)
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    adapter = train(base, features, rows, settings, str(home / "artifacts"), quiet)
    # The server's environment is then what aiplane's gets.
    if before is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = before

    # Serving: the same vLLM server (runtime, flags, environment), started directly; wait until it answers.
    from aiplane.plugins.vllm.runtime import SERVER_MODULE, ensure_vllm, server_args, server_env

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    args = server_args(str(model_dir), "base", host="127.0.0.1", port=port, extra=["--lora-modules", f"bare={_local(adapter.uri)}"])
    proc = subprocess.Popen(
        [str(ensure_vllm(lambda line: None)), "-m", SERVER_MODULE, *args], env=server_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("bare server died") from None
                time.sleep(0.5)
        # One completion, as `aiplane up` prints; then the factsheet: just the JSON.
        body = json.dumps({"model": "bare", "prompt": "Ticket: VPN down\nLabel:", "max_tokens": 8, "temperature": 0})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            json.loads(response.read())
        (home / "factsheet.json").write_text(json.dumps({"adapter": adapter.digest, "metrics": adapter.metrics}))
        print("done", flush=True)
        sys.stdin.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    if sys.argv[1:2] == ["--bare"]:
        home, model_dir, steps = sys.argv[2:5]
        bare(Path(home), Path(model_dir), int(steps))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps (local.yaml uses 150)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of each side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aiplane-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = _shared_model(tmp / "cache")
        times: dict[str, list[float]] = {"aiplane": [], "bare": []}
        for r in range(args.rounds):
            order = ("aiplane", "bare") if r % 2 == 0 else ("bare", "aiplane")
            for side in order:
                run = run_aiplane if side == "aiplane" else run_bare
                times[side].append(run(tmp / f"{side}-{r}", model_dir, args.steps))
                print(f"round {r + 1} {side:8} {times[side][-1]:7.2f} s", flush=True)
    a, b = min(times["aiplane"]), min(times["bare"])
    print(f"\nwhole chain, {args.steps} training steps, best of {args.rounds}, each side a new process:")
    print(f"  aiplane up                    {a:7.2f} s")
    print(f"  bare script                   {b:7.2f} s")
    print(f"  ratio aiplane / bare          {a / b:7.2f}x  (overhead {a - b:+.2f} s)")


if __name__ == "__main__":
    main()
