"""Benchmark: the same LoRA training job on the ``local`` engine and on the ``ray`` engine.

One base model directory (built once, before timing), one Iceberg snapshot of
the sample tickets and the trainer settings of ``deployments/local.yaml`` for
every run. Each round runs, in this order:

* ``local``: the local engine (one subprocess; torch uses every core);
* ``ray-1``: Ray Train with 1 worker holding every core (``resources_per_worker: {CPU: <cores>}``);
* ``ray-1-nomon``: the same with the resource monitor off (what sampling costs);
* ``ray-2``: Ray Train with 2 workers (DDP over gloo), the cores split between them;
* ``ray-1-pre``: ``ray-1`` prestarted (``engine.prestart`` with the imports ``aiplane up``
  asks for while it checks the deployment): its private Ray and its Train worker, which
  waits for the workload; waited for before the clock starts;
* ``local-pre``: the local engine prestarted the same way, the wall time to compare it with.

Ray runs use ``address: local`` (a private Ray per run). Reported per run: the
wall time of ``engine.run``; Ray's start-up on the run's critical path,
separately (driver + ``ray.init`` + worker processes until the workload starts;
for ``ray-1-pre`` what was left of it when the workload was handed over, and the
seconds the prestart took are shown beside it); and the steady state, the
training loop's seconds (``train_tokens / tokens_per_s``, checkpoints and
event forwarding included). The target is the Ray steady state within 1.15x of
the local engine at the same worker count (``ray-1`` against ``local``).

    .venv/bin/python bench/ray_vs_local.py [--steps N] [--rounds R] [--checkpoint-every K] [--only ray-1,ray-1-pre]

A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _inputs(home: Path):
    import pyarrow as pa

    from aiplane.core.plugins import Registry
    from aiplane.core.sample import generate_tickets, to_features
    from aiplane.plugins.peft.base_model import build_tiny_granite, resolve

    base = resolve(str(build_tiny_granite(home / "tiny-granite")), str(home))
    store = Registry().create(
        "feature store", "iceberg", {"catalog_uri": f"sqlite:///{home}/catalog.db", "warehouse": str(home / "warehouse")}
    )
    return base, store.publish(pa.Table.from_pylist(to_features(generate_tickets(300))), "tickets"), store.preload


def _run(name: str, engine_name: str, engine_settings: dict, trainer_settings: dict, inputs, home: Path) -> dict:
    from aiplane.core.config import Target
    from aiplane.core.plugins import Registry

    base, features, store_preload = inputs
    trainer = Registry().create("trainer", "lora", trainer_settings)
    workload = trainer.workload(base, features, str(home / name))
    engine = Registry().engine(engine_name, engine_settings)
    prestart = None
    if "-pre-" in name:
        # What `aiplane up` asks for (assets.resource.prestart_training): the store's and the trainer's imports.
        preload = tuple(dict.fromkeys((*store_preload, *trainer.preload)))
        t = time.perf_counter()
        assert engine.prestart(workload.entrypoint, preload, wait_s=900), f"the prestarted {engine_name} engine did not come up"
        prestart = time.perf_counter() - t
    started = time.perf_counter()
    result = engine.run(workload, Target(name=name, engine=engine_name, region="eu"), lambda event: None)
    wall = time.perf_counter() - started
    m, facts = result.metrics, result.engine
    steady = m["train_tokens"] / m["tokens_per_s"]
    startup = None
    if engine_name == "ray":
        # Driver process start and imports are what is left of the wall time before ray.init's end; a standby's
        # worker_start_s counts from the hand-over.
        startup = (0.0 if facts.get("prestarted") else facts["ray_init_s"]) + (facts["worker_start_s"] or 0.0)
    return {"wall": wall, "steady": steady, "startup": startup, "train": m["duration_s"], "facts": facts, "prestart": prestart}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="max_steps (default: deployments/local.yaml's)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--only", default="", help="comma-separated runs to make (default: all; local always runs)")
    args = parser.parse_args()

    trainer = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())["trainer"]["settings"]
    if args.steps:
        trainer["max_steps"] = args.steps
    cores = os.cpu_count() or 1
    ray = {"address": "local", "checkpoint_every": args.checkpoint_every}
    configs = [
        ("local", "local", {}),
        ("ray-1", "ray", {**ray, "num_workers": 1, "resources_per_worker": {"CPU": cores}}),
        ("ray-1-nomon", "ray", {**ray, "num_workers": 1, "resources_per_worker": {"CPU": cores}, "monitor_interval_s": 0}),
        ("ray-2", "ray", {**ray, "num_workers": 2, "resources_per_worker": {"CPU": max(1, cores // 2)}}),
        ("ray-1-pre", "ray", {**ray, "num_workers": 1, "resources_per_worker": {"CPU": cores}}),
        ("local-pre", "local", {}),
    ]
    if args.only:
        keep = {"local", *args.only.split(",")}
        configs = [c for c in configs if c[0] in keep]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory(prefix="aiplane-bench-ray-") as tmp:
        home = Path(tmp)
        inputs = _inputs(home)
        print(f"{cores} cores; trainer: {trainer['max_steps']} steps, batch {trainer['batch_size']}, seq_len "
              f"{trainer['seq_len']}, r {trainer['r']}; checkpoint every {args.checkpoint_every} steps on Ray")
        for round_ in range(args.rounds):
            for name, engine, settings in configs:
                run = _run(f"{name}-{round_}", engine, settings, trainer, inputs, home)
                runs[name].append(run)
                print(f"  round {round_ + 1} {name:12s} wall {run['wall']:6.2f}s  steady {run['steady']:6.2f}s"
                      + (f"  ray start-up {run['startup']:5.2f}s" if run["startup"] is not None else "")
                      + (f"  (prestart, before the run: {run['prestart']:5.2f}s)" if run["prestart"] else ""), flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    base = med("local", "steady")
    print("\nmedians over", args.rounds, "round(s)")
    print(f"{'run':12s} {'wall s':>8s} {'start-up s':>11s} {'train() s':>10s} {'steady s':>9s} {'steady/local':>13s}")
    for name, _, _ in configs:
        startup = med(name, "startup") if runs[name][0]["startup"] is not None else float("nan")
        print(f"{name:12s} {med(name, 'wall'):8.2f} {startup:11.2f} {med(name, 'train'):10.2f} "
              f"{med(name, 'steady'):9.2f} {med(name, 'steady') / base:13.3f}")
    names = {name for name, _, _ in configs}
    if {"ray-1", "ray-1-nomon"} <= names:
        mon = med("ray-1", "steady") / med("ray-1-nomon", "steady")
        print(f"\nresource monitor cost (ray-1 / ray-1-nomon steady): {mon:.3f}x")
    if {"ray-1", "ray-1-pre"} <= names:
        cut = med("ray-1", "startup") - med("ray-1-pre", "startup")
        print(f"ray start-up taken off the run by prestarting: {cut:.2f}s "
              f"({med('ray-1', 'startup'):.2f}s -> {med('ray-1-pre', 'startup'):.2f}s)")
    for name in [n for n in ("ray-1", "ray-2") if n in names]:
        workers = runs[name][-1]["facts"]["workers"].values()
        reports = [(w["reports"], w["report_s"]) for w in workers]
        print(f"{name} ray.train.report calls per worker and seconds blocked in them: {reports}")
    if "ray-2" in names:
        worker = next(iter(runs["ray-2"][-1]["facts"]["workers"].values()))
        print("ray-2 worker sample:", {k: worker[k] for k in sorted(worker) if k.startswith(("cpu", "rss"))})


if __name__ == "__main__":
    main()
