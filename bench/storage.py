"""Benchmark: object storage's three performance targets, measured side by side in one run.

Everything talks to real servers on loopback: moto's S3 server (``tests/_s3.py``)
and the Iceberg REST catalog double (``tests/_iceberg_rest_server.py``), both
started here in a child process so that, like a real S3, they do not compete
for the measured process's interpreter lock. Each figure is a median; the sides
of a comparison alternate within a round, and every feature-store call is made
on a freshly built store (a new catalog client), as a workload process does.

1. Feature scan: ``IcebergFeatureStore.read(record)`` through the REST catalog,
   table files on S3, against pyarrow reading the same Parquet data files
   (found through the catalog beforehand) from the same S3, same columns.
   Target: at most 1.1x. Short, so it runs three times ``--rounds``. The record
   of a snapshot the store wrote lists its few data files, so ``read`` fetches
   them while the catalog confirms the snapshot (same manifest list), instead of
   reading the manifests after it.
2. No-op refresh: ``publish`` of the rows of the current snapshot, shuffled, so
   the store commits nothing; at 10k rows and at ``--rows`` rows, through the
   REST catalog and through a SQL (SQLite) catalog, both with tables on S3.
   Target: at most 0.5 s.
3. Adapter publish: ``ArtifactStore.publish`` (digest included) of an adapter
   directory, one file of ``--adapter-mb`` random bytes and three small ones, to
   S3, against a plain upload of the same files with the same S3 client
   (pyarrow's ``copy_files``) and with boto3's ``upload_file``. Target: at most 1.2x.
4. Verification (``--only verify`` runs this alone): what checking an entry
   against its digest costs, next to loading its weights file with safetensors.
   The first check of a local entry hashes every file; later ones compare the
   files' stats with the record the first one left; publishing over an intact
   entry hashes it whole, on disk, or streamed from S3.

Every S3 client here uses the request-checksum policy aiplane's storage uses
(``storage.s3.checksums``, default ``when_required``: plain bodies), boto3's
included, so both sides of a comparison send the same bytes. ``--sdk-checksums
when_supported`` measures the AWS SDKs' own default instead (``aws-chunked``
bodies with a CRC trailer, which moto decodes in Python, slowly).

    .venv/bin/python bench/storage.py [--rounds N] [--rows N] [--adapter-mb N] [--sdk-checksums when_supported] [--only verify]

A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

KEY_ENV, SECRET_ENV = "AIPLANE_BENCH_S3_KEY", "AIPLANE_BENCH_S3_SECRET"


def serve(conn) -> None:
    """In a child process: moto's S3 server with a bucket, and a REST catalog on it, until told to stop."""
    import logging

    from _iceberg_rest_server import iceberg_rest_server
    from _s3 import s3_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with s3_server() as s3:
        bucket = s3.create_bucket()
        with iceberg_rest_server(f"s3://{bucket}/rest", file_io=s3.pyiceberg_properties(), vend_file_io=False) as rest:
            conn.send((s3, bucket, rest.url))
            conn.recv()


@contextlib.contextmanager
def servers():
    """``(s3, bucket, rest_catalog_url)`` of servers running in a child process, stopped on exit."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=serve, args=(child,), daemon=True)
    process.start()
    try:
        if not parent.poll(120):
            raise RuntimeError("the S3 and REST catalog servers did not start")
        yield parent.recv()
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        process.join(30)
        if process.is_alive():
            process.terminate()
            process.join()


def feature_rows(n: int, seed: int = 7):
    """``n`` feature rows: the sample's tickets repeated, each with its own id written into its prompt.

    Built with Arrow, not row by row. The id in the prompt keeps every row distinct,
    as real tickets are, so Parquet cannot dictionary-encode the text away.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from aiplane.core.components import FEATURE_COLUMNS
    from aiplane.core.sample import generate_tickets, to_features

    base = pa.Table.from_pylist(to_features(generate_tickets(min(n, 20_000), seed=seed)))
    rows = pa.concat_tables([base] * -(-n // base.num_rows)).slice(0, n).combine_chunks()
    ids = pa.array([f"T{seed:02d}-{i:07d}" for i in range(n)])
    # "Ticket: <subject>..." becomes "Ticket T07-0000042: <subject>...".
    prompts = pc.binary_join_element_wise("Ticket ", ids, pc.utf8_slice_codeunits(rows.column("prompt"), 6), "")
    return rows.set_column(0, "id", ids).set_column(1, "prompt", prompts).select(list(FEATURE_COLUMNS))


def shuffled(rows, seed: int):
    import numpy as np

    return rows.take(np.random.default_rng(seed).permutation(rows.num_rows))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def verdict(name: str, value: float, target: float, unit: str) -> str:
    shown = f"{value:.2f}x" if unit == "x" else f"{value:.3f}{unit}"
    return f"{name}: {shown} (target <= {target:g}{unit}): {'MET' if value <= target else 'NOT MET'}"


def bench_scan(make_rest, record, rounds: int, s3) -> tuple[float, float]:
    import pyarrow.parquet as pq

    from aiplane.core.components import FEATURE_COLUMNS

    def planning():
        # What a scan planned through pyiceberg does before any data file is opened: a catalog client,
        # load-table, the snapshot's manifests. read() fetches the files the record pins meanwhile.
        loaded = make_rest()._catalog(create=False).load_table(tuple(record.table.split(".")))
        return list(loaded.scan(snapshot_id=record.snapshot_id).plan_files())

    tasks = planning()
    files = [t.file.file_path.removeprefix("s3://") for t in tasks]
    size_mb = sum(t.file.file_size_in_bytes for t in tasks) / 1e6
    print(f"\n1. feature scan: {record.row_count:,} rows, {len(files)} Parquet file(s), {size_mb:.1f} MB on S3")

    def store_read():
        return make_rest().read(record)

    def pyarrow_read():
        return pq.read_table(files, filesystem=s3.pyarrow_filesystem(), columns=list(FEATURE_COLUMNS))

    times: dict[str, list[float]] = {"store.read": [], "pyarrow": [], "planning": []}
    for r in range(3 * rounds + 1):  # round 0 warms every path up (imports, connections)
        for side in ("store.read", "pyarrow") if r % 2 else ("pyarrow", "store.read"):
            elapsed, table = timed(store_read if side == "store.read" else pyarrow_read)
            if table.num_rows != record.row_count:
                print(f"   !! {side} returned {table.num_rows:,} rows, not {record.row_count:,}")
            if r:
                times[side].append(elapsed)
        elapsed, _ = timed(planning)
        if r:
            times["planning"].append(elapsed)
    store, direct, plan = (statistics.median(times[k]) for k in ("store.read", "pyarrow", "planning"))
    print(f"   store.read, REST catalog (new client)  {store:6.3f} s  (min {min(times['store.read']):.3f})")
    print(f"   pyarrow read_table, same files         {direct:6.3f} s  (min {min(times['pyarrow']):.3f})")
    print(f"   ratio {store / direct:.2f}x  (target <= 1.1x)")
    print(f"   planning a scan through the catalog alone {plan:.3f} s (client, load-table, manifests); store.read "
          f"skips the manifests when the record pins the files, and fetches those while it asks the catalog")  # fmt: skip
    return store, direct


def bench_noop_refresh(makers: dict[str, Callable], tables: dict[int, object], rounds: int) -> dict[tuple[str, int], float]:
    from aiplane.plugins.iceberg.store import _canonical_rows, _content_digest

    print("\n2. no-op refresh: publish of the current snapshot's rows, shuffled; nothing may be committed")
    results: dict[tuple[str, int], float] = {}
    for n, rows in tables.items():
        digest_s = statistics.median(timed(lambda rows=rows: _content_digest(_canonical_rows(rows)))[0] for _ in range(rounds))
        for kind, make in makers.items():
            table = f"features_{n}"
            current = make().current(table)
            times = []
            for r in range(rounds):
                again = shuffled(rows, r)
                elapsed, record = timed(lambda make=make, again=again, table=table: make().publish(again, table))
                times.append(elapsed)
                if record.snapshot_id != current.snapshot_id:
                    print(f"   !! {kind} {n:,} rows: the refresh committed a new snapshot")
            results[kind, n] = statistics.median(times)
            print(
                f"   {kind:4} catalog {n:>9,} rows  {results[kind, n]:6.3f} s"
                f"  (min {min(times):.3f}; the row digest alone {digest_s:.3f} s)"
            )
    return results


def bench_adapter(s3, s3_settings, size_mb: int, rounds: int) -> dict[str, float]:
    import boto3.s3.transfer
    from pyarrow import fs

    from aiplane.core.artifacts import sha256_path
    from aiplane.core.storage import ArtifactStore

    bucket = s3.create_bucket()
    store = ArtifactStore(f"s3://{bucket}/artifacts", s3=s3_settings)
    client = s3.boto3_client()
    s3fs = s3.pyarrow_filesystem()
    times: dict[str, list[float]] = {"ArtifactStore.publish": [], "pyarrow copy_files": [], "boto3 upload_file": [], "digest": [],
                                     "ArtifactStore.fetch": [], "boto3 download_file": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="aiplane-bench-adapter-") as tmp:
        staged = Path(tmp) / "adapter"
        staged.mkdir()
        weights = staged / "adapter_model.safetensors"
        weights.write_bytes(os.urandom(size_mb << 20))
        (staged / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}))
        (staged / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
        (staged / "README.md").write_text("# adapter\n")
        files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
        total_mb = sum((staged / f).stat().st_size for f in files) / 1e6
        print(f"\n3. adapter publish to S3: {len(files)} files, {total_mb:.1f} MB (one of {size_mb} MiB of random bytes)")

        def copy_files(prefix: str):
            return lambda: fs.copy_files(str(staged), f"{bucket}/{prefix}", destination_filesystem=s3fs)

        def upload_file(prefix: str):
            def run():
                config = boto3.s3.transfer.TransferConfig()
                for name in files:
                    client.upload_file(str(staged / name), bucket, f"{prefix}/{name}", Config=config)

            return run

        for r in range(rounds + 1):  # round 0 warms up (connections, first multipart upload)
            with open(weights, "r+b") as f:  # new bytes each round: publishing the same bytes again is a no-op
                f.write(r.to_bytes(8, "big") + os.urandom(8))
            sides = {"ArtifactStore.publish": lambda: store.publish(staged, "adapters"),
                     "pyarrow copy_files": copy_files(f"plain-{r}"), "boto3 upload_file": upload_file(f"boto3-{r}")}  # fmt: skip
            for side in list(sides) if r % 2 else list(reversed(sides)):
                elapsed, _ = timed(sides[side])
                if r:
                    times[side].append(elapsed)
            if r:
                times["digest"].append(timed(lambda: sha256_path(staged))[0])
                # The other way: what a deploy or a pod does with the published adapter (digest check included).
                uri = store.publish(staged, "adapters")[0]
                cache = Path(tmp) / f"cache-{r}"
                times["ArtifactStore.fetch"].append(timed(lambda uri=uri, cache=cache: store.fetch(uri, cache))[0])
                key = uri.removeprefix(f"s3://{bucket}/")
                down = Path(tmp) / f"boto3-{r}"

                def download(down: Path = down, key: str = key) -> None:
                    for name in files:
                        (down / name).parent.mkdir(parents=True, exist_ok=True)
                        client.download_file(bucket, f"{key}/{name}", str(down / name))

                times["boto3 download_file"].append(timed(download)[0])
                shutil.rmtree(cache), shutil.rmtree(down)
            # moto keeps every object in memory: drop this round's.
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for obj in page.get("Contents", []):
                    client.delete_object(Bucket=bucket, Key=obj["Key"])
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in ("ArtifactStore.publish", "pyarrow copy_files", "boto3 upload_file"):
        print(f"   {name:22} {med[name]:6.3f} s  (min {min(times[name]):.3f})")
    print(f"   the digest alone       {med['digest']:6.3f} s  (sha256_path of the staged directory; part of publish)")
    print(f"   ArtifactStore.fetch    {med['ArtifactStore.fetch']:6.3f} s  (into a new cache, digest checked; "
          f"boto3 download_file {med['boto3 download_file']:.3f} s, ratio "
          f"{med['ArtifactStore.fetch'] / med['boto3 download_file']:.2f}x)")  # fmt: skip
    for name in ("pyarrow copy_files", "boto3 upload_file"):
        print(f"   ratio publish / {name:18} {med['ArtifactStore.publish'] / med[name]:.2f}x  (target <= 1.2x)")
    return med


def bench_verify(s3, s3_settings, size_mb: int, rounds: int) -> dict[str, float]:
    """Section 4: the cost of checking an entry against its digest, next to loading its weights."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from aiplane.core.artifacts import forget_check
    from aiplane.core.storage import ArtifactStore, local_path

    times: dict[str, list[float]] = {k: [] for k in ("load", "first check", "later check", "publish again (disk)",
                                                     "publish again (S3)")}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="aiplane-bench-verify-") as tmp:
        staged = Path(tmp) / "adapter"
        staged.mkdir()
        rng = np.random.default_rng(0)
        save_file({"w": rng.standard_normal((size_mb << 18,), dtype=np.float32)}, str(staged / "adapter_model.safetensors"))
        (staged / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32}))
        local = ArtifactStore(Path(tmp) / "artifacts")
        remote = ArtifactStore(f"s3://{s3.create_bucket()}/artifacts", s3=s3_settings)
        uri = local.publish(staged, "adapters")[0]
        remote.publish(staged, "adapters")  # so that the timed publishes below find the entry there
        entry = local_path(uri)
        print(f"\n4. verification of a {size_mb} MiB adapter entry (medians of {rounds})")
        for _ in range(rounds):
            times["load"].append(timed(lambda: load_file(str(entry / "adapter_model.safetensors")))[0])
            forget_check(entry)
            times["first check"].append(timed(lambda: local.fetch(uri, Path(tmp) / "cache"))[0])
            times["later check"].append(timed(lambda: local.fetch(uri, Path(tmp) / "cache"))[0])
            times["publish again (disk)"].append(timed(lambda: local.publish(staged, "adapters"))[0])
            times["publish again (S3)"].append(timed(lambda: remote.publish(staged, "adapters"))[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"   safetensors load_file  {med['load']:6.3f} s  (what a check is compared with)")
    for name in ("first check", "later check", "publish again (disk)", "publish again (S3)"):
        print(f"   {name:22} {med[name]:6.3f} s  ({med[name] / med['load']:.2f}x the load)")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per figure (medians are reported)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the large feature table (scan and refresh)")
    parser.add_argument("--adapter-mb", type=int, default=128, help="size of the adapter's weights file, MiB")
    parser.add_argument(
        "--sdk-checksums", choices=("when_required", "when_supported"), default="when_required",
        help="AWS_REQUEST_CHECKSUM_CALCULATION for every S3 client of this process: when_required (aiplane's "
        "default, plain bodies) or when_supported (the AWS SDKs' default: aws-chunked bodies with a CRC trailer)",
    )  # fmt: skip
    parser.add_argument("--only", choices=("verify",), help="run one section alone")
    args = parser.parse_args()
    os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] = args.sdk_checksums.upper()

    import pyarrow

    from aiplane.core.config import S3Settings, SecretRef
    from aiplane.plugins.iceberg import IcebergFeatureStore

    print(f"python {sys.version.split()[0]}, pyarrow {pyarrow.__version__}, {os.cpu_count()} CPU(s), "
          f"load average {os.getloadavg()[0]:.1f}, {args.rounds} rounds (medians), S3 SDK checksums: {args.sdk_checksums}")  # fmt: skip
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="aiplane-bench-storage-") as tmp:
        s3, bucket, rest_url = stack.enter_context(servers())
        os.environ[KEY_ENV], os.environ[SECRET_ENV] = s3.access_key_id, s3.secret_access_key
        if args.only == "verify":
            s3_settings = S3Settings(endpoint=s3.endpoint_url, region=s3.region,
                                     access_key_id=SecretRef(env=KEY_ENV), secret_access_key=SecretRef(env=SECRET_ENV))  # fmt: skip
            bench_verify(s3, s3_settings, args.adapter_mb, args.rounds)
            return
        s3_refs = {"endpoint": s3.endpoint_url, "region": s3.region,
                   "access_key_id": {"env": KEY_ENV}, "secret_access_key": {"env": SECRET_ENV}}  # fmt: skip
        makers = {
            "rest": lambda: IcebergFeatureStore({"catalog": "rest", "catalog_uri": rest_url, "s3": s3_refs}),
            "sql": lambda: IcebergFeatureStore(
                {"catalog_uri": f"sqlite:///{tmp}/catalog.db", "warehouse": f"s3://{bucket}/sql", "s3": s3_refs}
            ),
        }
        tables = {n: feature_rows(n) for n in sorted({10_000, args.rows})}
        for n, rows in tables.items():  # set-up: the tables the scan reads and the refreshes find unchanged
            for make in makers.values():
                make().publish(rows, f"features_{n}")

        store_s, direct_s = bench_scan(makers["rest"], makers["rest"]().current(f"features_{args.rows}"), args.rounds, s3)
        refresh = bench_noop_refresh(makers, tables, args.rounds)
        s3_settings = S3Settings(
            endpoint=s3.endpoint_url, region=s3.region,
            access_key_id=SecretRef(env=KEY_ENV), secret_access_key=SecretRef(env=SECRET_ENV),
        )  # fmt: skip
        adapter = bench_adapter(s3, s3_settings, args.adapter_mb, args.rounds)

    publish = adapter["ArtifactStore.publish"]
    print("\nverdicts:")
    print("  " + verdict(f"1. feature scan, store.read / pyarrow, {args.rows:,} rows", store_s / direct_s, 1.1, "x"))
    worst = max(refresh, key=refresh.get)
    print("  " + verdict(f"2. no-op refresh, slowest of {len(refresh)} ({worst[0]} catalog, {worst[1]:,} rows)", refresh[worst], 0.5, " s"))
    ratios = [(name, publish / adapter[name]) for name in ("pyarrow copy_files", "boto3 upload_file")]
    print(f"  3. adapter publish / plain upload, {args.adapter_mb} MiB (target <= 1.2x): "
          + "; ".join(f"{ratio:.2f}x vs {name}: {'MET' if ratio <= 1.2 else 'NOT MET'}" for name, ratio in ratios))  # fmt: skip


if __name__ == "__main__":
    main()
