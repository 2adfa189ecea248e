"""Adapters published for real into a loopback S3 (moto), for the serving targets' contract tests.

A cluster's serving target hands the adapter's ``s3://`` URI to KServe, and aiplane verifies the
entry against its digest first; so the records these tests deploy name real, complete entries of an
:class:`~aiplane.core.storage.ArtifactStore`, each published once per module.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from _s3 import s3_server
from aiplane.core.config import S3Settings
from aiplane.core.records import AdapterRecord, BaseModelRecord
from aiplane.core.storage import ArtifactStore

__all__ = ["AdapterStore", "adapter_store", "adapter_bucket", "published_adapter", "published_model", "bucket_s3"]

BUCKET = "aiplane-eu"
ROOT = f"s3://{BUCKET}/aiplane"


class AdapterStore:
    """The bucket ``aiplane-eu`` of a running moto server, and the entries published into it."""

    def __init__(self, s3: S3Settings, client):
        self.s3, self.client = s3, client
        self.store = ArtifactStore(ROOT, s3=s3)
        self._published: dict[tuple, tuple[str, str]] = {}

    def publish(self, *key) -> tuple[str, str]:
        """``(uri, digest)`` of a small entry whose contents are ``key``: the same key, the same entry."""
        if key not in self._published:
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "adapter_config.json").write_text(json.dumps(list(key)))
                Path(tmp, "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)
                self._published[key] = self.store.publish(tmp, "adapters")
        return self._published[key]

    def flip_byte(self, uri: str, name: str = "adapter_model.safetensors") -> None:
        """Change one byte of file ``name`` of the entry at ``uri``, in the bucket, as a fault would."""
        key = f"{uri.removeprefix(f's3://{BUCKET}/')}/{name}"
        data = bytearray(self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        self.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))


@contextlib.contextmanager
def adapter_store() -> Iterator[AdapterStore]:
    """A moto server with bucket ``aiplane-eu``, its keys in the environment (as a pod's would be)."""
    with s3_server() as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", server.access_key_id)
        mp.setenv("AWS_SECRET_ACCESS_KEY", server.secret_access_key)
        server.create_bucket(BUCKET)
        yield AdapterStore(S3Settings(endpoint=server.endpoint_url, region=server.region), server.boto3_client())


_CURRENT: list[AdapterStore] = []


@pytest.fixture(scope="module", autouse=True)
def adapter_bucket() -> Iterator[AdapterStore]:
    """Imported into a test module: its adapters are real entries in a loopback S3, which the targets verify."""
    with adapter_store() as store:
        _CURRENT.append(store)
        yield store
        _CURRENT.clear()


def published_adapter(n: int, base: BaseModelRecord, r: int = 16) -> AdapterRecord:
    """LoRA adapter ``n`` of ``base``, published into the module's bucket (the same ``n``, the same entry)."""
    uri, digest = _CURRENT[0].publish("lora", n)
    return AdapterRecord(uri=uri, digest=digest, method="lora", config={"r": r}, metrics={}, run_id=f"run{n}",
                         sources=(base,))  # fmt: skip


def published_model(n: int, base: BaseModelRecord, **config) -> AdapterRecord:
    """Whole model ``n`` (what ``sft`` publishes), trained from ``base``, published into the module's bucket."""
    uri, digest = _CURRENT[0].publish("sft", n)
    return AdapterRecord(uri=uri, digest=digest, method="sft", config={**config, "full_model": True}, metrics={},
                         run_id=f"sft{n}", sources=(base,))  # fmt: skip


def bucket_s3() -> S3Settings:
    """The module's bucket's S3 settings, for a workload that reads it."""
    return _CURRENT[0].s3
