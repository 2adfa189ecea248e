"""The storage seam: content-addressed artifacts on local disk and on a real S3 endpoint (moto's server)."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from aiplane.core.config import S3Settings, SecretRef
from aiplane.core.errors import ConfigError, InputError
from aiplane.core.artifacts import sha256_path
from aiplane.core.storage import COMPLETE_SUFFIX, QUARANTINE, ArtifactStore, Storage, local_path, normalize_uri
from _flaky import FlakyRelay


@pytest.fixture(scope="module")
def s3():
    from _s3 import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    """S3 settings whose keys are references to environment variables, as a deployment writes them."""
    monkeypatch.setenv("TEST_S3_KEY", s3.access_key_id)
    monkeypatch.setenv("TEST_S3_SECRET", s3.secret_access_key)
    return S3Settings(
        endpoint=s3.endpoint_url,
        region=s3.region,
        access_key_id=SecretRef(env="TEST_S3_KEY"),
        secret_access_key=SecretRef(env="TEST_S3_SECRET"),
    )


def _adapter(tmp_path: Path, content: bytes = b"weights") -> Path:
    staged = tmp_path / "staged"
    (staged / "sub").mkdir(parents=True, exist_ok=True)
    (staged / "adapter_model.safetensors").write_bytes(content)
    (staged / "sub" / "adapter_config.json").write_text('{"r": 4}')
    return staged


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path, s3, s3_env):
    if request.param == "file":
        return ArtifactStore(tmp_path / "artifacts")
    return ArtifactStore(f"s3://{s3.create_bucket()}/prefix", s3=s3_env)


def test_publish_is_content_addressed_and_a_second_publish_is_a_no_op(store, tmp_path):
    uri, digest = store.publish(_adapter(tmp_path), "adapters")
    assert uri == f"{store.root}/adapters/{digest.removeprefix('sha256:')}"
    assert store.complete(uri)
    manifest = json.loads(store.storage.read_bytes(uri + COMPLETE_SUFFIX))
    assert manifest["digest"] == digest and manifest["kind"] == "adapters"
    assert manifest["files"] == ["adapter_model.safetensors", "sub/adapter_config.json"]
    # Each file's size and sha256: what a check compares, and how it names the file that changed.
    assert manifest["sizes"] == {"adapter_model.safetensors": 7, "sub/adapter_config.json": 8}
    assert manifest["sha256"]["adapter_model.safetensors"] == hashlib.sha256(b"weights").hexdigest()
    assert store.publish(_adapter(tmp_path), "adapters") == (uri, digest)


def test_fetch_gives_a_local_copy_checked_against_the_digest(store, tmp_path):
    uri, digest = store.publish(_adapter(tmp_path, b"abc"), "adapters")
    local = store.fetch(uri, tmp_path / "cache")
    assert (local / "adapter_model.safetensors").read_bytes() == b"abc"
    assert (local / "sub" / "adapter_config.json").is_file()
    assert store.fetch(uri, tmp_path / "cache") == local, "fetched once per digest"


def test_a_publish_that_crashed_before_its_marker_is_invisible_to_readers(store, tmp_path):
    staged = _adapter(tmp_path, b"half")
    from aiplane.core.artifacts import sha256_path

    uri = store.uri_for("adapters", sha256_path(staged))
    store.storage.upload_dir(staged, uri)  # the files, then a crash: no marker
    assert not store.complete(uri)
    with pytest.raises(InputError, match="is not complete"):
        store.fetch(uri, tmp_path / "cache")
    # Publishing again finishes the job.
    assert store.publish(staged, "adapters")[0] == uri and store.complete(uri)


def test_an_altered_object_in_the_store_is_refused_on_fetch(s3, s3_env, tmp_path):
    store = ArtifactStore(f"s3://{s3.create_bucket()}/a", s3=s3_env)
    uri, _ = store.publish(_adapter(tmp_path), "adapters")
    store.storage.write_bytes(uri + "/adapter_model.safetensors", b"tampered")
    with pytest.raises(InputError, match="does not match its digest"):
        store.fetch(uri, tmp_path / "cache")
    assert not (tmp_path / "cache" / "adapters").exists() or not any((tmp_path / "cache" / "adapters").iterdir())


def test_a_missing_bucket_is_a_clear_error(s3_env, tmp_path):
    store = ArtifactStore("s3://no-such-bucket-aiplane/x", s3=s3_env)
    with pytest.raises(InputError, match="no-such-bucket-aiplane.*(Create the bucket|NoSuchBucket|does not exist)") as error:
        store.publish(_adapter(tmp_path), "adapters")
    assert "tried" not in str(error.value), "a missing bucket is not retried"


def test_credentials_are_named_by_reference_never_by_value(s3, monkeypatch, tmp_path):
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    unset = SecretRef(env="NOT_SET_KEY")
    settings = S3Settings(endpoint=s3.endpoint_url, access_key_id=unset, secret_access_key=unset)
    with pytest.raises(ConfigError, match="NOT_SET_KEY"):
        Storage(settings).exists(f"s3://{s3.create_bucket()}/x")
    monkeypatch.setenv("NOT_SET_KEY", "hunter2-value")
    assert "hunter2-value" not in repr(settings)


@pytest.mark.parametrize(
    "uri, expected",
    [("s3://bucket/a/b/", "s3://bucket/a/b"), ("/tmp/x/../y", "file:///tmp/x/../y"), ("file:///tmp/z", "file:///tmp/z")],
)
def test_uris_are_normalized(uri, expected):
    assert normalize_uri(uri) == expected


def test_a_scheme_no_storage_handles_is_rejected_with_what_works():
    with pytest.raises(ConfigError, match="no storage handles the scheme 'gs'.*s3://bucket/prefix"):
        normalize_uri("gs://bucket/x")


def test_a_base_model_in_object_storage_is_fetched_once_per_digest(s3, s3_env, tmp_path):
    from aiplane.core.artifacts import sha256_path
    from aiplane.core.records import BaseModelRecord
    from aiplane.core.workload import Workload, WorkloadContext
    from aiplane.plugins.peft.base_model import build_tiny_granite, config, resolve

    model = build_tiny_granite(tmp_path / "tiny")
    bucket = s3.create_bucket()
    uri = f"s3://{bucket}/models/tiny-granite"
    Storage(s3_env).upload_dir(model, uri)

    assert config(uri, str(tmp_path / "home"), s3_env)["model_type"] == "granite"
    record = resolve(uri, str(tmp_path / "home"), s3_env)
    assert isinstance(record, BaseModelRecord)
    assert record.uri == uri and record.digest == sha256_path(model)
    cached = tmp_path / "home" / "cache" / "models" / record.digest.removeprefix("sha256:")
    assert sha256_path(cached) == record.digest
    # Unchanged in the bucket: resolved again without a download.
    (cached / "marker-of-this-copy").write_text("same copy")
    assert resolve(uri, str(tmp_path / "home"), s3_env).digest == record.digest
    assert (cached / "marker-of-this-copy").exists()
    (cached / "marker-of-this-copy").unlink()

    # A workload anywhere fetches it by URI and digest into its own cache.
    ctx = WorkloadContext(Workload(name="w", entrypoint="x:y", s3=s3_env, cache_dir=str(tmp_path / "pod")), lambda e: None)
    local = ctx.local(record.uri, record.digest)
    assert local.is_relative_to(tmp_path / "pod") and sha256_path(local) == record.digest


def test_a_base_model_uri_with_nothing_in_the_bucket_is_a_clear_error(s3, s3_env, tmp_path):
    from aiplane.plugins.peft.base_model import config, resolve

    uri = f"s3://{s3.create_bucket()}/models/missing"
    with pytest.raises(InputError, match="has no config.json"):
        config(uri, str(tmp_path), s3_env)
    with pytest.raises(InputError, match="is empty or does not exist"):
        resolve(uri, str(tmp_path), s3_env)


def _deployment_with_storage(tmp_path, storage: dict):
    import yaml

    from aiplane.core.config import load_deployment

    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    raw["storage"] = storage
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_deployment(path, home=tmp_path)


def test_a_workload_placed_in_a_region_writes_under_that_regions_location_only(tmp_path):
    d = _deployment_with_storage(tmp_path, {"regions": {"eu": "s3://eu-bucket/aiplane", "us": "s3://us-bucket/aiplane"}})
    assert d.artifact_root("eu") == "s3://eu-bucket/aiplane"
    assert d.artifact_root("us") == "s3://us-bucket/aiplane"
    with pytest.raises(ConfigError, match="storage.regions has no location for region 'ap'"):
        d.artifact_root("ap")


def test_a_region_may_have_a_store_of_its_own_and_only_its_workloads_get_its_settings(tmp_path):
    us_store = {"endpoint": "https://s3.us-east-1.amazonaws.com", "path_style": False,
                "access_key_id": {"secret": "aws-us", "key": "id"}, "secret_access_key": {"secret": "aws-us", "key": "secret"}}
    d = _deployment_with_storage(tmp_path, {
        "s3": {"endpoint": "https://s3.eu-de.cloud-object-storage.appdomain.cloud"},
        "regions": {"eu": "s3://eu-bucket/aiplane", "us": {"root": "s3://us-bucket/aiplane", "s3": us_store}},
    })  # fmt: skip
    assert d.artifact_root("eu") == "s3://eu-bucket/aiplane" and d.artifact_root("us") == "s3://us-bucket/aiplane"
    us = S3Settings.model_validate(us_store)
    assert d.storage.routes("us") == {"s3://us-bucket/aiplane": us} == d.storage.routes()
    assert d.storage.routes("eu") == {}  # an EU workload is not handed the US store's keys, not even by name


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"s3": {"endpoint": "http://127.0.0.1:9000"},
          "regions": {"us": {"root": "s3://us/x", "s3": {"endpoint": "http://127.0.0.1:9001", "checksums": "when_supported"}}}},
         r"the S3 stores' checksums settings differ \(when_required, when_supported\)"),
        ({"regions": {"eu": "s3://shared/aiplane", "us": {"root": "s3://shared/aiplane/us", "s3": {}}}},
         r"the locations of 'eu' \(s3://shared/aiplane\) and 'us' \(s3://shared/aiplane/us\) overlap"),
        ({"regions": {"eu": "/data/eu", "us": "/data/eu"}}, r"the locations of 'eu' .* and 'us' .* overlap"),
        ({"regions": {"us": {"root": "/data/us", "s3": {"endpoint": "http://127.0.0.1:9001"}}}},
         r"regions.us: s3 is set, but its root '/data/us' is not in object storage"),
    ],
    ids=["two-checksum-policies", "nested-roots", "one-root-twice", "a-store-for-a-local-root"],
)  # fmt: skip
def test_the_stores_of_a_deployment_are_refused_when_they_cannot_work_together(storage, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        _deployment_with_storage(tmp_path, storage)


def test_a_uri_under_a_routed_root_is_reached_with_its_settings_and_the_rest_with_the_default(s3, s3_env, tmp_path):
    bucket = s3.create_bucket()
    from _s3 import dead_endpoint

    default = S3Settings(endpoint=dead_endpoint())
    storage = Storage(default, {f"s3://{bucket}/us": s3_env})
    storage.write_bytes(f"s3://{bucket}/us/a/b.json", b"{}")
    assert storage.read_bytes(f"s3://{bucket}/us/a/b.json") == b"{}"
    assert storage.settings_for(f"s3://{bucket}/us/a") is s3_env
    assert storage.settings_for(f"s3://{bucket}/usa/a") is default  # beside the root, not under it
    with pytest.raises(InputError, match="Could not connect"):
        storage.read_bytes(f"s3://{bucket}/eu/a/b.json")
    # A content-addressed store over it publishes under the route, and its readers find it there.
    store = ArtifactStore(f"s3://{bucket}/us/artifacts", storage=storage)
    uri, _ = store.publish(_adapter(tmp_path), "adapters")
    assert store.complete(uri) and storage.settings_for(uri) is s3_env


def test_a_workload_names_every_credential_its_storage_reads_once(s3_env):
    from aiplane.core.workload import Workload

    us = S3Settings(access_key_id=SecretRef(secret="aws-us", key="id"), secret_access_key=SecretRef(secret="aws-us", key="secret"))
    workload = Workload(name="w", entrypoint="m:f", s3=s3_env, s3_routes={"s3://us/x": us, "s3://us/y": us})
    assert workload.secret_refs() == [
        SecretRef(env="TEST_S3_KEY"), SecretRef(env="TEST_S3_SECRET"),
        SecretRef(secret="aws-us", key="id"), SecretRef(secret="aws-us", key="secret"),
    ]  # fmt: skip
    assert Workload.model_validate_json(workload.model_dump_json()).storage().settings_for("s3://us/x/z") == us
    # Without routes the spec is what an earlier aiplane's worker reads: no field it would refuse.
    assert "s3_routes" not in json.loads(Workload(name="w", entrypoint="m:f", s3=s3_env).model_dump_json())


def test_two_credentials_arriving_as_one_environment_variable_are_refused():
    from aiplane.core.workload import Workload

    def store(secret: str, key: str) -> S3Settings:
        return S3Settings(access_key_id=SecretRef(secret=secret, key=key), secret_access_key=SecretRef(secret=secret, key="k"))

    workload = Workload(name="w", entrypoint="m:f", s3=store("aws", "us-id"), s3_routes={"s3://us/x": store("aws-us", "id")})
    with pytest.raises(ConfigError, match="both arrive as the environment variable AWS_US_ID"):
        workload.secret_refs()


def test_the_preflight_finds_target_regions_without_storage_and_bad_schemes(tmp_path):
    from aiplane.core.plugins import Registry
    from aiplane.core.preflight import preflight

    d = _deployment_with_storage(tmp_path, {"regions": {"us": "s3://us/x", "ap": "gs://nope/x"}})
    problems = "\n".join(preflight(d, Registry()))
    assert "target 'local' is in region 'eu', which has no storage location" in problems
    assert "storage.regions.ap: Storage URI 'gs://nope/x': no storage handles the scheme 'gs'" in problems


def test_a_location_is_within_a_root_only_below_it_not_beside_it():
    from aiplane.core.storage import within

    assert within("s3://eu/aiplane/factsheets", "s3://eu/aiplane") and within("s3://eu/aiplane/", "s3://eu/aiplane")
    assert not within("s3://eu/aiplane-us/factsheets", "s3://eu/aiplane")
    assert not within("s3://us/aiplane", "s3://eu/aiplane")
    assert within("/data/eu/x", "file:///data/eu") and not within("/data/euro", "/data/eu")


def test_with_per_region_storage_every_location_a_target_or_component_writes_stays_in_its_region(tmp_path):
    from aiplane.core.plugins import Registry
    from aiplane.core.preflight import preflight

    # local.yaml writes Ray checkpoints, kfp.local outputs, factsheets and its Iceberg tables under {home},
    # outside the EU location.
    d = _deployment_with_storage(tmp_path, {"regions": {"eu": str(tmp_path / "eu")}})
    problems = [p for p in preflight(d, Registry()) if "outside the storage location" in p]
    assert sorted(p.split(":")[0] for p in problems) == [
        "factsheet.settings.directory", "feature_store.settings.warehouse",
        "targets[kfp-local].settings.pipeline_root", "targets[ray-local].settings.storage_path",
    ]  # fmt: skip
    assert f"put it under {tmp_path / 'eu'}" in problems[0]


def test_placement_refuses_a_region_whose_location_a_component_would_write_outside_of(tmp_path):
    from aiplane.assets.resource import _placed
    from aiplane.core.plugins import Registry

    eu = tmp_path / "eu"
    d = _deployment_with_storage(tmp_path, {"regions": {"eu": str(eu)}})
    with pytest.raises(ConfigError) as err:
        _placed(d, Registry(), "factsheet", "publish-factsheet", ("eu",))
    assert "publish-factsheet placed on 'local' in region 'eu'" in str(err.value)
    assert f"factsheet.settings.directory: {tmp_path / 'factsheets'} is outside" in str(err.value)
    trainer, decision = _placed(d, Registry(), "trainer", "train-adapter", ("eu",))  # the trainer writes nothing itself
    assert decision.target == "local"


def test_a_remote_pipelines_target_must_say_where_its_task_outputs_go_when_storage_is_per_region(tmp_path):
    from aiplane.core.preflight import location_problems
    from aiplane.plugins.kfp.engine import KfpEngine

    d = _deployment_with_storage(tmp_path, {"regions": {"eu": "s3://eu/aiplane"}})
    remote = {"mode": "remote", "host": "https://dsp.example.com", "base_image": "quay.io/x/y:1", "results_dir": "s3://eu/aiplane/r"}
    (problem,) = location_problems(d, KfpEngine(remote), "eu", "targets[kfp].settings")
    assert problem.startswith("targets[kfp].settings.pipeline_root is not set") and "s3://eu/aiplane" in problem
    assert location_problems(d, KfpEngine({**remote, "pipeline_root": "s3://eu/aiplane/p"}), "eu", "t") == []


def test_s3_clients_send_plain_bodies_unless_told_otherwise_and_an_explicit_variable_wins(monkeypatch):
    from aiplane.core.config import S3Settings

    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    S3Settings().pyarrow_kwargs()
    assert os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] == "WHEN_REQUIRED"
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_SUPPORTED")
    S3Settings().pyarrow_kwargs()
    assert os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] == "WHEN_SUPPORTED"
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION")
    S3Settings(checksums="when_supported").pyiceberg_properties()
    assert os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] == "WHEN_SUPPORTED"
    with pytest.raises(ValueError, match="checksums"):
        S3Settings(checksums="always")


def test_without_storage_settings_artifacts_stay_under_home(tmp_path):
    d = _deployment_with_storage(tmp_path, {})
    assert d.artifact_root("eu") == (tmp_path / "artifacts").as_uri()
    assert d.cache_dir() == tmp_path / "cache"


# --- What is stored is what its digest names -------------------------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    """Change one byte in place, keeping the file's size and modification time (as bit rot or a careless edit would)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _alter(store: ArtifactStore, uri: str, name: str) -> None:
    if store.root.startswith("file://"):
        _flip_a_byte(local_path(uri) / name)
    else:
        data = bytearray(store.storage.read_bytes(f"{uri}/{name}"))
        data[0] ^= 0x01
        store.storage.write_bytes(f"{uri}/{name}", bytes(data))


def test_publishing_over_an_altered_entry_quarantines_it_and_republishes_the_new_copy(store, tmp_path):
    staged = _adapter(tmp_path, b"good weights")
    uri, digest = store.publish(staged, "adapters")
    _alter(store, uri, "adapter_model.safetensors")
    heard: list[str] = []
    assert store.publish(staged, "adapters", log=heard.append) == (uri, digest)
    assert "adapter_model.safetensors changed" in heard[0] and "moved it aside" in heard[0]
    assert store.storage.read_bytes(f"{uri}/adapter_model.safetensors") == b"good weights"
    assert store.fetch(uri, tmp_path / "cache") and sha256_path(store.fetch(uri, tmp_path / "cache")) == digest
    moved = heard[0].split("moved it aside to ", 1)[1].split(" ", 1)[0]
    assert f"/adapters/{QUARANTINE}/{digest[7:]}." in moved
    assert store.storage.read_bytes(f"{moved}/adapter_model.safetensors") != b"good weights", "the altered bytes are kept"


def test_an_altered_local_entry_is_refused_by_name_on_every_path_that_serves_it(tmp_path):
    from aiplane.core.workload import Workload, WorkloadContext

    store = ArtifactStore(tmp_path / "artifacts")
    uri, digest = store.publish(_adapter(tmp_path), "adapters")
    ctx = WorkloadContext(Workload(name="deploy-endpoint", entrypoint="x:y", cache_dir=str(tmp_path / "cache")), print)
    assert ctx.local(uri) == local_path(uri), "intact: served from where it is"
    _flip_a_byte(local_path(uri) / "adapter_model.safetensors")
    # What a serving target (and so a rollback) calls to get the adapter: never the altered bytes.
    with pytest.raises(InputError, match=rf"{digest[7:]}.*not the artifact its digest names: adapter_model.safetensors "
                                         r"changed.*moved aside.*aiplane up --force"):
        ctx.local(uri)
    with pytest.raises(InputError, match=r"not complete.*an altered copy was moved aside to .*\.quarantine"):
        store.fetch(uri, tmp_path / "cache")


def test_a_check_hashes_an_entry_once_and_again_only_after_a_file_changed(tmp_path, monkeypatch):
    import aiplane.core.artifacts as artifacts

    store = ArtifactStore(tmp_path / "artifacts")
    uri, _ = store.publish(_adapter(tmp_path), "adapters")
    hashed = []
    real = artifacts.digest_tree
    monkeypatch.setattr(artifacts, "digest_tree", lambda *a, **k: hashed.append(a[0]) or real(*a, **k))
    store.fetch(uri, tmp_path / "cache")
    store.fetch(uri, tmp_path / "cache")
    assert len(hashed) == 1, "the second fetch trusts the first check while no file changed"
    (local_path(uri) / "sub" / "adapter_config.json").write_text('{"r": 5}')
    with pytest.raises(InputError, match="sub/adapter_config.json changed"):
        store.fetch(uri, tmp_path / "cache")


def test_an_entry_published_before_manifests_held_file_digests_is_still_checked(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    uri, digest = store.publish(_adapter(tmp_path), "adapters")
    # The manifest an earlier aiplane wrote: names only.
    names_only = {"digest": digest, "kind": "adapters", "files": ["adapter_model.safetensors", "sub/adapter_config.json"]}
    store.storage.write_bytes(uri + COMPLETE_SUFFIX, json.dumps(names_only).encode())
    assert store.fetch(uri, tmp_path / "cache") == local_path(uri)
    _flip_a_byte(local_path(uri) / "adapter_model.safetensors")
    with pytest.raises(InputError, match="not the artifact its digest names"):
        store.fetch(uri, tmp_path / "cache")


def test_a_changed_cached_copy_of_a_remote_entry_is_downloaded_again(s3, s3_env, tmp_path):
    store = ArtifactStore(f"s3://{s3.create_bucket()}/a", s3=s3_env)
    uri, digest = store.publish(_adapter(tmp_path, b"remote weights"), "adapters")
    copy = store.fetch(uri, tmp_path / "cache")
    _flip_a_byte(copy / "adapter_model.safetensors")
    again = store.fetch(uri, tmp_path / "cache")
    assert (again / "adapter_model.safetensors").read_bytes() == b"remote weights" and sha256_path(again) == digest


# --- Transient faults while publishing -----------------------------------------------------------------------------


@pytest.fixture
def flaky_store(s3, s3_env, monkeypatch):
    """An artifact store reached through a relay that drops its first N connections; short retry delays."""
    monkeypatch.setattr(Storage, "retry_delays", (0.05, 0.05, 0.05))
    bucket, relays = s3.create_bucket(), []

    def make(drop: int) -> tuple[ArtifactStore, FlakyRelay]:
        relays.append(FlakyRelay(s3.endpoint_url, drop))
        settings = s3_env.model_copy(update={"endpoint": relays[-1].url})
        return ArtifactStore(f"s3://{bucket}/a", s3=settings), relays[-1]

    yield make
    for relay in relays:
        relay.close()


def test_a_publish_rides_out_an_outage_longer_than_the_s3_clients_own_retries(flaky_store, tmp_path):
    store, relay = flaky_store(drop=4)  # the S3 client alone gives up after 3
    uri, digest = store.publish(_adapter(tmp_path, b"kept"), "adapters")
    assert relay.dropped == 4 and store.complete(uri)
    assert sha256_path(store.fetch(uri, tmp_path / "cache")) == digest


def test_a_store_that_stays_down_fails_the_publish_after_bounded_retries_naming_it(flaky_store, tmp_path):
    store, relay = flaky_store(drop=10**6)
    with pytest.raises(InputError, match=r"Storage 's3://.*/adapters/[0-9a-f]{64}.*' \(tried 4 times\):.*NETWORK_CONNECTION"):
        store.publish(_adapter(tmp_path), "adapters")


def test_verify_names_the_altered_file_of_an_entry_in_object_storage_without_fetching_it(s3, s3_env, tmp_path):
    store = ArtifactStore(f"s3://{s3.create_bucket()}/a", s3=s3_env)
    uri, _ = store.publish(_adapter(tmp_path, b"served by a server that fetches it itself"), "adapters")
    assert store.verify(uri) == []
    _alter(store, uri, "sub/adapter_config.json")
    assert store.verify(uri) == ["sub/adapter_config.json"]


def test_a_complete_entry_whose_files_were_deleted_is_refused_with_a_message(tmp_path):
    import shutil

    store = ArtifactStore(tmp_path / "artifacts")
    uri, _ = store.publish(_adapter(tmp_path), "adapters")
    shutil.rmtree(local_path(uri))
    with pytest.raises(InputError, match="not the artifact its digest names: adapter_model.safetensors, sub/adapter_config.json"):
        store.fetch(uri, tmp_path / "cache")
