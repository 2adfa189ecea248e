"""Small, local inputs for the kit's checks: what a component under test is handed.

Every record points at real files under a directory the caller gives (pytest's
``tmp_path``), with real digests, so a component that reads or verifies them can.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiplane.core.artifacts import sha256_path
from aiplane.core.components import FEATURE_COLUMNS
from aiplane.core.config import ComponentSpec, Deployment, Target
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord, FeaturesRecord

__all__ = [
    "sample_base_model",
    "sample_features",
    "sample_adapter",
    "sample_endpoint",
    "sample_document",
    "sample_rows",
    "sample_deployment",
    "conformance_target",
]


def _file(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return sha256_path(path)


def sample_base_model(root: Path) -> BaseModelRecord:
    """A base model record over a ``config.json`` in ``root/base-model`` (no weights: nothing here loads it)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}
    digest = _file(Path(root) / "base-model" / "config.json", json.dumps(config))
    return BaseModelRecord(
        uri=str(Path(root) / "base-model"), digest=digest, name="conformance-tiny", architecture="llama", parameters=1000
    )


def sample_features(root: Path) -> FeaturesRecord:
    return FeaturesRecord(
        uri=f"file://{Path(root) / 'features'}",
        digest="iceberg-snapshot:1",
        table="conformance_train",
        snapshot_id=1,
        row_count=4,
        columns=FEATURE_COLUMNS,
        residency=("eu",),
    )


def sample_adapter(root: Path) -> AdapterRecord:
    """An adapter record (``lora``) over an ``adapter_config.json`` in ``root/adapter``, made from the samples above."""
    base = sample_base_model(root)
    digest = _file(Path(root) / "adapter" / "adapter_config.json", json.dumps({"r": 8, "peft_type": "LORA"}))
    return AdapterRecord(
        uri=str(Path(root) / "adapter"),
        digest=digest,
        method="lora",
        config={"r": 8},
        metrics={"train_loss": [2.0, 1.5, 1.2], "eval_loss": 1.3},
        run_id="conformance",
        sources=(sample_features(root), base),
    )


def sample_endpoint(root: Path, serving: str = "conformance") -> EndpointRecord:
    """An endpoint record (of a server that is not running) for publishers to publish a factsheet of."""
    adapter = sample_adapter(root)
    return EndpointRecord(
        uri="http://127.0.0.1:9",
        digest=adapter.digest,
        url="http://127.0.0.1:9",
        model_name="conformance-endpoint",
        protocols=("openai-completions",),
        serving=serving,
        sources=(adapter,),
    )


def sample_document(endpoint: EndpointRecord) -> dict[str, Any]:
    """The factsheet document of ``endpoint``, as aiplane's ``factsheet`` asset builds it."""
    from aiplane.core.factsheet import build_factsheet

    return build_factsheet(endpoint, who="conformance-kit")


def sample_rows(variant: int = 0) -> Any:
    """A pyarrow table with :data:`FEATURE_COLUMNS`; another ``variant`` gives other rows."""
    import pyarrow as pa

    ids = [f"r{variant}-{i}" for i in range(4)]
    return pa.table(
        {
            "id": ids,
            "prompt": [f"question {i} of variant {variant}" for i in range(4)],
            "completion": [f"answer {i}" for i in range(4)],
            "residency": ["eu", "eu", "us", "eu"],
            "split": ["train", "train", "train", "eval"],
        }
    )


def conformance_target(engine: str = "local") -> Target:
    return Target(name="conformance", engine=engine, region="local")


def sample_deployment(root: Path, kind: str = "", name: str = "", settings: dict[str, Any] | None = None) -> Deployment:
    """A deployment whose ``kind`` (``engine``, ``feature_store``, ``trainer``, ``serving``, ``factsheet``) is ``name``.

    The other components are the built-ins' names; nothing here loads a plugin.
    """
    specs = {
        "feature_store": ComponentSpec(name="iceberg"),
        "trainer": ComponentSpec(name="lora"),
        "serving": ComponentSpec(name="vllm"),
        "factsheet": ComponentSpec(name="local"),
    }
    target = conformance_target(name if kind == "engine" else "local")
    if kind == "engine":
        target = target.model_copy(update={"settings": dict(settings or {})})
    elif kind:
        specs[kind] = ComponentSpec(name=name, settings=dict(settings or {}))
    return Deployment(name="conformance", home=Path(root), targets=(target,), **specs)
