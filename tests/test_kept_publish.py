"""A trained adapter outlives a store outage at publish time, and its record names where things are kept.

Real parts: the tiny Granite trained by the real loop, moto's S3 server behind a
relay that drops every connection while the store is "down".
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from aiplane.core.artifacts import sha256_path
from aiplane.core.config import S3Settings
from aiplane.core.errors import InputError
from aiplane.core.sample import generate_tickets, to_features
from aiplane.core.storage import ArtifactStore, Storage
from aiplane.core.workload import Event, Workload, WorkloadContext
from aiplane.plugins.peft.base_model import build_tiny_granite, resolve
from aiplane.plugins.peft.train import train
from _flaky import FlakyRelay
from _s3 import s3_server
from conftest import features_record

SETTINGS = dict(
    r=4, alpha=8, target_modules=["q_proj", "v_proj"], max_steps=2, batch_size=4, seq_len=64,
    learning_rate=0.01, seed=0, eval_limit=0, log_every=1,
)  # fmt: skip


def _run(base_model, rows, root: str, s3: S3Settings | None, cache: Path, routes=None) -> tuple[object, list[Event], str]:
    """``train`` as the workload runs it, with the storage settings the orchestrator hands it; (record or error, events, run id)."""
    events: list[Event] = []
    workload = Workload(name="train-adapter", entrypoint="x:y", s3=s3, s3_routes=routes or {}, cache_dir=str(cache))
    ctx = WorkloadContext(workload, events.append)
    try:
        return train(base_model, features_record(rows), rows, SETTINGS, root, ctx), events, ctx.run_id
    except InputError as exc:
        return exc, events, ctx.run_id


def _trained(events: list[Event]) -> bool:
    return any(e.type == "log" and e.message.startswith("step ") for e in events)


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    """A training whose publish meets a store that is down, then the next run with the store back."""
    tmp = tmp_path_factory.mktemp("outage")
    rows = to_features(generate_tickets(60))
    with s3_server() as server, pytest.MonkeyPatch.context() as mp:
        mp.setattr(Storage, "retry_delays", (0.05, 0.05, 0.05))
        up = S3Settings(endpoint=server.endpoint_url, region=server.region)
        mp.setenv("AWS_ACCESS_KEY_ID", server.access_key_id)
        mp.setenv("AWS_SECRET_ACCESS_KEY", server.secret_access_key)
        bucket = server.create_bucket()
        # The base model lives in the bucket, as in a deployment whose storage is S3 and training runs on `local`.
        model_uri = f"s3://{bucket}/models/tiny-granite"
        Storage(up).upload_dir(build_tiny_granite(tmp / "tiny"), model_uri)
        base_model = resolve(model_uri, str(tmp / "home"), up)
        relay = FlakyRelay(server.endpoint_url, drop=10**9)
        down = up.model_copy(update={"endpoint": relay.url})
        root, cache = f"s3://{bucket}/artifacts", tmp / "home" / "cache"
        # Only the artifact store is down: the base model is still fetched.
        failed = _run(base_model, rows, root, up, cache, routes={root: down})
        relay.close()
        kept = sorted((cache / "staged").iterdir()) if (cache / "staged").is_dir() else []
        if kept:
            shutil.copytree(kept[0], tmp / "kept-copy" / kept[0].name)
        published = _run(base_model, rows, root, up, cache)
        store = ArtifactStore(root, s3=up)
        fetched = sha256_path(store.fetch(published[0].uri, tmp / "elsewhere")) if store.complete(published[0].uri) else None
        yield dict(failed=failed, kept=kept, published=published, fetched=fetched, base_model=base_model, cache=cache,
                   rows=rows, up=up, root=root, kept_copy=tmp / "kept-copy")  # fmt: skip


def test_a_store_outage_at_publish_fails_the_run_saying_the_adapter_is_kept(outage):
    error, events, _ = outage["failed"]
    assert isinstance(error, InputError) and _trained(events)
    assert "tried 4 times" in str(error) and "NETWORK_CONNECTION" in str(error)
    (kept,) = outage["kept"]
    assert f"kept at {kept}" in str(error) and "next `aiplane up` publishes it without training again" in str(error)
    assert (outage["kept_copy"] / kept.name / "files" / "adapter_model.safetensors").is_file()


def test_the_next_run_publishes_the_kept_adapter_without_training_again(outage):
    (_, _, first_run), (record, events, _) = outage["failed"], outage["published"]
    assert not _trained(events), "the second run did not train"
    assert any("not training again" in e.message for e in events)
    assert record.run_id == first_run, "the record is the training run's"
    assert outage["fetched"] == record.digest, "what is in the store is what the record names"
    assert not any((outage["cache"] / "staged").iterdir()), "the kept copy is consumed"


def test_the_adapter_record_names_the_base_model_where_it_is_stored_not_the_workers_copy(outage):
    record = outage["published"][0]
    assert record.source("base_model").uri == outage["base_model"].uri.rstrip("/")
    assert record.source("base_model").uri.startswith("s3://")
    assert str(outage["cache"]) not in record.model_dump_json()


def test_a_kept_adapter_whose_files_changed_is_dropped_and_trained_again(outage, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(outage["kept_copy"], cache / "staged")
    (kept,) = (cache / "staged").iterdir()
    weights = kept / "files" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    record, events, _ = _run(outage["base_model"], outage["rows"], outage["root"], outage["up"], cache)
    assert _trained(events) and any("dropping it and training again" in e.message for e in events)
    assert record.digest == outage["published"][0].digest, "trained again: the same bytes the first run trained"
