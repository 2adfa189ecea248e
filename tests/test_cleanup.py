"""Cleanup is aiplane's promise: after a deploy that failed or was cancelled, what it started does not survive.

The careless target (tests/_careless_target.py) starts a server in a session of its own, then fails; only its
``cleanup()`` knows the server. The kit holds a target's cleanup to that; the Dagster asset calls it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from _careless_target import CarelessTarget, ForgetfulTarget
from aiplane.core.components import ServingTarget
from aiplane.core.errors import PluginError
from aiplane.core.hookspecs import hookimpl
from aiplane.core.plugins import Registry, get_plugin_manager
from aiplane.testing import ConformanceError, check_serving_target


def _gone(pid: int, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_kit_passes_a_careless_target_whose_cleanup_stops_what_its_failed_deploy_left(tmp_path, workload_path):
    check_serving_target(CarelessTarget, {"directory": str(tmp_path / "noted")}, tmp_path, deploy=False)
    assert _gone(int((tmp_path / "noted" / "server.pid").read_text()))


def test_kit_names_a_cleanup_that_leaves_a_failed_deploys_server_running(tmp_path, workload_path):
    said = r"serving target 'forgetful': cleanup\(\) after a cancelled deploy left its processes running: \['pid \d+ \(.*time.sleep"
    with pytest.raises(ConformanceError, match=said):
        check_serving_target(ForgetfulTarget, {"directory": str(tmp_path / "noted")}, tmp_path, deploy=False)
    assert _gone(int((tmp_path / "noted" / "server.pid").read_text())), "the kit stops what it found left running"


class _NoStop(ServingTarget):
    name = "no-stop"

    def workload(self, adapter, endpoint_name):
        raise NotImplementedError


def test_a_serving_target_missing_a_method_aiplane_calls_is_refused_naming_its_plugin_and_the_method(clean_plugin_env):
    class Plugin:
        @hookimpl
        def aiplane_serving_targets(self):
            return [_NoStop]

    pm = get_plugin_manager(entry_points=False)
    pm.register(Plugin(), name="half-done")
    said = r"plugin 'half-done': test_cleanup._NoStop \('no-stop'\) does not define stop, which aiplane calls"
    with pytest.raises(PluginError, match=said):
        Registry(pm).create("serving target", "no-stop")


def _tiny_model(path: Path) -> Path:
    """A config and one safetensors file with the layers LoRA targets: what the preflight reads of a model."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "granite", "architectures": ["GraniteForCausalLM"]}))
    weights = {f"model.layers.0.self_attn.{m}.weight": np.zeros((8, 8), np.float32) for m in ("q_proj", "v_proj")}
    save_file(weights, str(path / "model.safetensors"))
    return path


def _materialize_careless(tmp_path: Path, monkeypatch, selection: str, upstream: str, record, **components):
    """Materialize ``selection`` with the careless plugin's components, ``upstream`` as if already materialized."""
    import dagster as dg
    import yaml

    from aiplane.assets import ASSETS, AiplaneResource
    from aiplane.assets import resource as resource_module
    from aiplane.assets.state import RecordIOManager
    from aiplane.core.config import load_deployment
    from aiplane.core.records import record_to_json
    from _careless_target import Plugin

    def with_careless(entry_points: bool = True):
        pm = get_plugin_manager(entry_points)
        pm.register(Plugin(), name="careless")
        return pm

    monkeypatch.setattr(resource_module, "get_plugin_manager", with_careless)
    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    raw.update(components)
    raw["base_model"] = {"uri": str(_tiny_model(tmp_path / "model"))}  # the preflight reads its headers only
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(raw))
    instance = dg.DagsterInstance.ephemeral()
    # What the step reads, as a finished upstream run would have left it.
    seeded = {"record": dg.MetadataValue.json(record_to_json(record))}
    instance.report_runless_asset_event(dg.AssetMaterialization(upstream, metadata=seeded))
    result = dg.materialize(
        ASSETS, selection=selection, instance=instance, raise_on_error=False,
        resources={"aiplane": AiplaneResource(deployment=str(tmp_path / "deployment.yaml"), home=str(tmp_path / "home")),
                   "io_manager": RecordIOManager()},
    )  # fmt: skip
    assert not result.success
    return [str(e.step_failure_data.error) for e in result.all_events if e.is_step_failure]


def test_nothing_of_a_careless_targets_failed_deploy_survives_the_dagster_materialization(
    tmp_path, workload_path, monkeypatch, clean_plugin_env
):
    from aiplane.testing.fixtures import sample_adapter

    serving = {"name": "careless", "settings": {"directory": str(tmp_path / "noted")}}
    failures = _materialize_careless(tmp_path, monkeypatch, "served_endpoint", "adapter_weights",
                                     sample_adapter(tmp_path / "adapter"), serving=serving)  # fmt: skip
    assert any("careless: the server (pid" in f for f in failures), failures
    assert _gone(int((tmp_path / "noted" / "server.pid").read_text()), within_s=5), "the failed deploy's server survived"


def test_a_careless_publishers_failed_publish_leaves_nothing_half_written_once_the_materialization_ends(
    tmp_path, workload_path, monkeypatch, clean_plugin_env
):
    from aiplane.testing.fixtures import sample_endpoint

    factsheet = {"name": "careless-publisher", "settings": {"directory": str(tmp_path / "sheets")}}
    endpoint = sample_endpoint(tmp_path / "endpoint")
    failures = _materialize_careless(tmp_path, monkeypatch, "factsheet", "served_endpoint", endpoint, factsheet=factsheet)
    assert any("careless-publisher: gave up half-way" in f for f in failures), failures
    assert (tmp_path / "sheets").is_dir(), "the publish ran and wrote its partial folder"
    assert list((tmp_path / "sheets").iterdir()) == [], "the failed publish's partial folder was cleaned up"
