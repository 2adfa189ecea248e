"""The whole chain through `aiplane up` with every artifact and the feature table in object storage.

A real S3 endpoint (moto's server) and an Iceberg REST catalog with IBM Cloud IAM
(the loopback double) run on 127.0.0.1; the `aiplane` command runs in its own
process and reaches both only through the deployment's settings and secret
references, as it would reach IBM Cloud Object Storage and watsonx.data.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aiplane.core.config import load_deployment
from conftest import stop_endpoints

pytestmark = pytest.mark.e2e

TINY_TRAINING = {"max_steps": 8, "batch_size": 4, "seq_len": 64, "eval_limit": 4, "log_every": 4}
API_KEY = "aiplane-test-apikey"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    from _iceberg_rest_server import IamAuth, iceberg_rest_server
    from _s3 import s3_server

    home = tmp_path_factory.mktemp("home")
    with s3_server() as s3:
        bucket = s3.create_bucket()
        with iceberg_rest_server(
            f"s3://{bucket}/warehouse", auth=IamAuth(api_keys=(API_KEY,)), file_io=s3.pyiceberg_properties(),
            vend_file_io=False, catalog_name="iceberg_data",
        ) as catalog:  # fmt: skip
            s3_settings = {
                "endpoint": s3.endpoint_url, "region": s3.region,
                "access_key_id": {"env": "COS_HMAC_ACCESS_KEY_ID"}, "secret_access_key": {"env": "COS_HMAC_SECRET_ACCESS_KEY"},
            }  # fmt: skip
            raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
            raw["targets"] = [t for t in raw["targets"] if t["name"] == "local"]
            raw["trainer"]["settings"].update(TINY_TRAINING)
            raw["storage"] = {"root": f"s3://{bucket}/aiplane", "s3": s3_settings}
            raw["feature_store"] = {
                "name": "watsonx-data",
                "settings": {
                    "url": catalog.url.removesuffix("/mds/iceberg"), "catalog": "iceberg_data", "namespace": "aiplane",
                    "api_key": {"env": "WATSONX_DATA_APIKEY"}, "iam_url": catalog.iam_url, "s3": s3_settings,
                },
            }  # fmt: skip
            raw["factsheet"]["settings"]["directory"] = f"s3://{bucket}/factsheets"
            (home / "deployment.yaml").write_text(yaml.safe_dump(raw))
            env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "AIPLANE_DEPLOYMENT")}
            env.update(
                AIPLANE_HOME=str(home), COS_HMAC_ACCESS_KEY_ID=s3.access_key_id,
                COS_HMAC_SECRET_ACCESS_KEY=s3.secret_access_key, WATSONX_DATA_APIKEY=API_KEY,
            )  # fmt: skip
            cmd = [sys.executable, "-m", "aiplane.assets.cli", "--deployment", str(home / "deployment.yaml"), "up"]
            out = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=900)
            try:
                keys = [o["Key"] for page in s3.boto3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
                        for o in page.get("Contents", [])]  # fmt: skip
                yield {"home": home, "out": out, "keys": keys, "catalog": catalog, "bucket": bucket}
            finally:
                stop_endpoints(home)


def test_up_runs_the_chain_against_object_storage_and_a_rest_catalog(cloud):
    out = cloud["out"]
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Endpoint:     http://127.0.0.1:" in out.stdout
    assert "Completion:" in out.stdout and "did not answer" not in out.stderr


def test_every_artifact_and_the_feature_table_live_in_the_bucket(cloud):
    keys = cloud["keys"]
    adapters = [k for k in keys if k.startswith("aiplane/adapters/") and k.endswith(".complete")]
    assert len(adapters) == 1, keys
    assert any(k.startswith("warehouse/") and k.endswith(".parquet") for k in keys), "the table's data files"
    assert any(k.startswith("warehouse/") and k.endswith(".metadata.json") for k in keys), "the table's metadata"
    assert any(k.startswith("factsheets/") and k.endswith("/factsheet.json") for k in keys)
    assert "factsheets/latest.json" in keys


def test_nothing_but_caches_and_runtime_state_is_written_to_the_local_home(cloud):
    home = cloud["home"]
    written = {p.name for p in home.iterdir()}
    assert not written & {"artifacts", "iceberg", "factsheets"}, written
    # The adapter the server loaded was fetched from the bucket into the cache, by digest.
    assert any((home / "cache" / "adapters").iterdir())


def test_the_catalog_was_reached_with_renewed_iam_tokens_only(cloud):
    calls = [c for c in cloud["catalog"].requests if c.path.startswith("/mds/")]
    assert calls and all(c.auth == "bearer" and c.status < 400 for c in calls if c.status != 404)
    assert cloud["catalog"].calls("POST", "/identity/token"), "an API key was exchanged at IAM"


def test_the_lineage_names_the_bucket_and_the_snapshot(cloud):
    out = cloud["out"].stdout
    lineage = out[out.index("Lineage:"):]
    assert f"s3://{cloud['bucket']}/aiplane/adapters/" in lineage
    assert "iceberg://iceberg_data/aiplane.support_ticket_features?snapshot=" in lineage
    assert f"s3://{cloud['bucket']}/factsheets/" in lineage
