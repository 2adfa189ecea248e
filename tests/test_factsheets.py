"""Factsheets: the document built from records, and the local publisher."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import aiplane.core
from aiplane.core.artifacts import sha256_path
from aiplane.core.components import FEATURE_COLUMNS
from aiplane.core.config import load_deployment
from aiplane.core.errors import ConfigError, InputError
from aiplane.core.factsheet import build_factsheet
from aiplane.core.plugins import Registry, get_plugin_manager
from aiplane.core.records import (
    AdapterRecord,
    BaseModelRecord,
    EndpointRecord,
    FactsheetRecord,
    FeaturesRecord,
    PlacementDecision,
)
from aiplane.core.workload import Workload, execute
from aiplane.plugins.factsheets.publisher import LocalFactsheetPublisher

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_REASON = "first target in eu with the engine and SLA batch; data tagged eu stays in eu"
SERVE_REASON = "pinned <interactive> target & region eu"


def _write(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


@pytest.fixture
def chain(tmp_path):
    """A realistic chain: base model -> features snapshot -> LoRA adapter -> served endpoint."""
    model_dir = _write(tmp_path / "models" / "tiny-granite", {"config.json": '{"architectures": ["GraniteForCausalLM"]}'})
    base = BaseModelRecord(
        uri=str(model_dir),
        digest=sha256_path(model_dir),
        name="tiny-granite (random init)",
        architecture="GraniteForCausalLM",
        parameters=443_008,
    )
    features = FeaturesRecord(
        uri="iceberg://aiplane/aiplane.tickets?snapshot=7290512345",
        digest="iceberg-snapshot:7290512345",
        table="aiplane.tickets",
        snapshot_id=7290512345,
        row_count=480,
        columns=FEATURE_COLUMNS,
        residency=("eu", "us"),
        store={"name": "iceberg", "settings": {"catalog_uri": "sqlite:////x/catalog.db", "token": {"env": "CAT_TOKEN"}}},
    )
    adapter_dir = _write(tmp_path / "artifacts" / "staged", {"adapter_config.json": '{"r": 8}', "adapter_model.bin": "weights"})
    adapter = AdapterRecord(
        uri=str(adapter_dir),
        digest=sha256_path(adapter_dir),
        method="lora",
        config={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "max_steps": 6},
        metrics={
            "loss_curve": [6.9, 6.1, 5.2, 4.6, 4.1, 3.9],
            "eval_loss": 4.02,
            "eval_accuracy": 0.625,
            "train_seconds": 2.5,
        },
        run_id="a1b2c3d4e5f6",
        placement=PlacementDecision(
            workload="train-lora",
            target="local",
            engine="local",
            region="eu",
            reason=TRAIN_REASON,
            rejected={"us-gpu": "region 'us' is outside the regions allowed for data tagged eu, us (eu)"},
        ),
        sources=(base, features),
    )
    endpoint = EndpointRecord(
        uri="http://127.0.0.1:38123/v1/models/tickets",
        digest=adapter.digest,
        url="http://127.0.0.1:38123",
        model_name="tickets",
        protocols=("v1", "v2"),
        serving="vllm",
        handle={"pid": 424242, "state_file": "/secret/handle/state.json"},
        placement=PlacementDecision(
            workload="deploy-tickets", target="local", engine="local", region="eu", reason=SERVE_REASON
        ),
        sources=(adapter,),
    )
    return {"base": base, "features": features, "adapter": adapter, "endpoint": endpoint}


def test_factsheet_names_snapshot_base_model_adapter_endpoint_and_placement_reasons(chain):
    doc = build_factsheet(chain["endpoint"], who="auditor", extra={"ticket": "CHG-1"})
    adapter = chain["adapter"]

    assert doc["features"]["snapshot_id"] == 7290512345
    assert doc["features"]["table"] == "aiplane.tickets"
    assert doc["features"]["residency"] == ["eu", "us"]
    assert doc["base_model"]["digest"] == chain["base"].digest
    assert doc["base_model"]["parameters"] == 443_008
    assert doc["adapter"]["sha256"] == adapter.digest.removeprefix("sha256:")
    assert doc["endpoint"]["url"] == "http://127.0.0.1:38123"
    assert doc["training"]["metrics"]["loss_curve"] == [6.9, 6.1, 5.2, 4.6, 4.1, 3.9]
    assert doc["training"]["metrics"]["eval_accuracy"] == 0.625
    assert doc["training"]["run_id"] == "a1b2c3d4e5f6"
    assert [(p["workload"], p["reason"]) for p in doc["placement"]] == [
        ("train-lora", TRAIN_REASON),
        ("deploy-tickets", SERVE_REASON),
    ]
    assert "us-gpu" in doc["placement"][0]["rejected"]
    assert [step["kind"] for step in doc["lineage"]] == [
        "features", "base_model", "training_run", "adapter_weights", "served_endpoint",
    ]
    assert doc["lineage"][0]["digest"] == "iceberg-snapshot:7290512345"
    assert doc["lineage"][3]["digest"] == adapter.digest
    assert doc["generated_by"]["who"] == "auditor"
    assert doc["extra"] == {"ticket": "CHG-1"}
    # JSON-ready, and nothing but record facts: no serving handle, no feature-store settings.
    text = json.dumps(doc)
    assert "424242" not in text and "/secret/handle" not in text and "CAT_TOKEN" not in text


def test_factsheet_author_defaults_to_aiplane_user_and_code_version_is_the_checkout_commit(chain, monkeypatch):
    monkeypatch.setenv("AIPLANE_USER", "ci-bot")
    doc = build_factsheet(chain["endpoint"])
    assert doc["generated_by"]["who"] == "ci-bot"
    assert doc["generated_by"]["when"].endswith("+00:00")
    assert doc["generated_by"]["aiplane_version"]
    head = subprocess.run(
        ["git", "-C", str(Path(aiplane.core.__file__).parent), "rev-parse", "HEAD"],
        capture_output=True, text=True, check=False,
    )
    if head.returncode != 0:
        pytest.skip("aiplane is not imported from a git checkout here")
    dirty = subprocess.run(
        ["git", "-C", str(Path(aiplane.core.__file__).parent), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    assert doc["generated_by"]["code_version"] == head.stdout.strip() + ("-dirty" if dirty else "")


def test_factsheet_without_features_in_lineage_raises_input_error_naming_it(chain):
    adapter = chain["adapter"].model_copy(update={"sources": (chain["base"],)})
    endpoint = chain["endpoint"].model_copy(update={"sources": (adapter,)})
    with pytest.raises(InputError, match="no features") as err:
        build_factsheet(endpoint)
    assert "tickets" in str(err.value)


def test_factsheet_of_endpoint_without_adapter_raises_input_error(chain):
    endpoint = chain["endpoint"].model_copy(update={"sources": ()})
    with pytest.raises(InputError, match="adapter_weights"):
        build_factsheet(endpoint)


def test_factsheet_rejects_a_record_that_is_neither_an_endpoint_nor_an_adapter(chain):
    with pytest.raises(InputError, match="EndpointRecord"):
        build_factsheet(chain["features"])  # type: ignore[arg-type]  # the wrong record is the point


def test_factsheet_extra_that_is_not_json_raises_input_error(chain):
    with pytest.raises(InputError, match="JSON"):
        build_factsheet(chain["endpoint"], extra={"when": object()})


def test_local_publisher_is_registered_and_takes_the_local_deployment_settings(tmp_path):
    cls = Registry(get_plugin_manager()).get("factsheet publisher", "local")
    assert cls is LocalFactsheetPublisher
    settings = load_deployment("local", home=tmp_path).factsheet.settings
    assert LocalFactsheetPublisher(settings).settings.directory == str(tmp_path / "factsheets")


def test_local_publisher_without_directory_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="directory"):
        LocalFactsheetPublisher({})


def _publish(directory: Path, endpoint: EndpointRecord, doc: dict) -> FactsheetRecord:
    workload = LocalFactsheetPublisher({"directory": str(directory)}).workload(endpoint, doc)
    # Engines ship workloads as JSON; it must survive the trip unchanged.
    assert Workload.model_validate_json(workload.model_dump_json()) == workload
    return execute(workload).outputs["factsheet"]


def test_publish_writes_json_html_and_png_atomically_with_matching_digest(chain, tmp_path):
    doc = build_factsheet(chain["endpoint"], who="auditor")
    directory = tmp_path / "factsheets"
    record = _publish(directory, chain["endpoint"], doc)

    folder = Path(record.uri).parent
    assert folder.parent == directory and folder.name.startswith("tickets-")
    assert json.loads(Path(record.uri).read_text()) == doc
    assert record.digest == sha256_path(record.uri)
    assert record.publisher == "local" and record.sources == (chain["endpoint"],)
    assert (folder / "loss.png").read_bytes().startswith(PNG_MAGIC)
    page = Path(record.page_uri).read_text()
    assert "7290512345" in page and chain["base"].digest in page
    assert TRAIN_REASON in page and "us-gpu" in page
    assert "data:image/png;base64," in page
    # Reasons are escaped, not markup.
    assert "pinned &lt;interactive&gt; target &amp; region eu" in page and "<interactive>" not in page
    assert (directory / "latest.json").read_text() == Path(record.uri).read_text()
    assert sorted(p.name for p in directory.iterdir()) == ["latest.json", folder.name]


def test_republishing_an_identical_document_reuses_the_folder(chain, tmp_path):
    doc = build_factsheet(chain["endpoint"])
    directory = tmp_path / "factsheets"
    first = _publish(directory, chain["endpoint"], doc)
    mtime = Path(first.uri).stat().st_mtime_ns
    second = _publish(directory, chain["endpoint"], doc)

    assert (second.uri, second.digest, second.page_uri) == (first.uri, first.digest, first.page_uri)
    assert Path(first.uri).stat().st_mtime_ns == mtime
    assert len([p for p in directory.iterdir() if p.is_dir()]) == 1

    changed = _publish(directory, chain["endpoint"], {**doc, "extra": {"note": "re-evaluated"}})
    assert changed.uri != first.uri
    assert json.loads((directory / "latest.json").read_text())["extra"] == {"note": "re-evaluated"}


def test_failed_publish_leaves_no_partial_folder(chain, tmp_path, monkeypatch):
    doc = build_factsheet(chain["endpoint"])
    directory = tmp_path / "factsheets"

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(OSError, match="disk full"):
        _publish(directory, chain["endpoint"], doc)
    assert list(directory.iterdir()) == []


def test_page_without_a_loss_curve_still_renders_a_chart(chain, tmp_path):
    adapter = chain["adapter"].model_copy(update={"metrics": {"eval_accuracy": 0.5}})
    endpoint = chain["endpoint"].model_copy(update={"sources": (adapter,)})
    record = _publish(tmp_path / "factsheets", endpoint, build_factsheet(endpoint))
    assert (Path(record.uri).parent / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert "eval_accuracy" in Path(record.page_uri).read_text()


def test_publish_workload_rejects_a_document_that_is_not_json(chain, tmp_path):
    publisher = LocalFactsheetPublisher({"directory": str(tmp_path / "factsheets")})
    with pytest.raises(InputError, match="JSON"):
        publisher.workload(chain["endpoint"], {"bad": {1, 2}})
    assert not (tmp_path / "factsheets").exists()


def test_training_run_in_lineage_names_where_it_ran(chain):
    execution = {
        "engine": "kfp", "target": "kfp-local", "run_id": "run-7", "run_url": "https://dsp/runs/run-7",
        "pipeline_version": "sha256-abc", "workers": [{"cpu_peak": 90}],
    }  # fmt: skip
    adapter = chain["adapter"].model_copy(update={"execution": execution})
    endpoint = chain["endpoint"].model_copy(update={"sources": (adapter,)})
    doc = build_factsheet(endpoint)
    run = next(step for step in doc["lineage"] if step["kind"] == "training_run")
    assert run["uri"] == "https://dsp/runs/run-7"
    assert run["execution"] == {
        "engine": "kfp", "pipeline_version": "sha256-abc", "run_id": "run-7", "run_url": "https://dsp/runs/run-7", "target": "kfp-local",
    }  # fmt: skip
    assert doc["training"]["execution"]["workers"] == [{"cpu_peak": 90}]
