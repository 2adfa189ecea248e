"""The built-ins keep the plugin contract as ``aiplane.testing`` checks it, and the kit names the promise a
careless component breaks. Only what runs here cheaply: the vLLM target is left to its own tests (a server
start costs more than this module's budget) and the lora trainer is checked without training or building a model."""

from __future__ import annotations

import threading

import pytest

from aiplane.core.components import Engine, ServingTarget
from aiplane.core.records import EndpointRecord
from aiplane.core.workload import Workload, execute
from aiplane.plugins.factsheets.publisher import LocalFactsheetPublisher
from aiplane.plugins.iceberg.store import IcebergFeatureStore
from aiplane.plugins.local.engine import LocalEngine
from aiplane.plugins.peft.trainer import LoraTrainer
from aiplane.testing import (
    ConformanceError,
    check_engine,
    check_factsheet_publisher,
    check_feature_store,
    check_serving_target,
    check_trainer,
)

LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "max_steps": 2, "batch_size": 2, "seq_len": 32, "learning_rate": 0.01}


def test_local_engine_keeps_the_engine_contract(tmp_path):
    check_engine(LocalEngine, {}, tmp_path)


def test_iceberg_store_keeps_the_feature_store_contract(tmp_path):
    settings = {"catalog_uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": str(tmp_path / "wh")}
    check_feature_store(IcebergFeatureStore, settings, tmp_path)


def test_local_publisher_keeps_the_factsheet_publisher_contract(tmp_path):
    check_factsheet_publisher(LocalFactsheetPublisher, {"directory": str(tmp_path / "factsheets")}, tmp_path)


def test_lora_trainer_keeps_the_trainer_contract_before_training(tmp_path):
    # Not describe: LoRA's workload() checks its settings against the model, which builds it (~20 s of imports here).
    check_trainer(LoraTrainer, LORA, tmp_path, describe=False)


class _WritingCheck(IcebergFeatureStore):
    name = "writes-in-check"

    def check(self, deployment):
        (deployment.home / "probe").write_text("x")
        return []


def test_kit_names_a_check_that_writes(tmp_path):
    settings = {"catalog_uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": str(tmp_path / "wh")}
    with pytest.raises(ConformanceError, match=r"feature store 'writes-in-check': check\(\) must not write anything"):
        check_feature_store(_WritingCheck, settings, tmp_path)


class _LenientSettings(LocalEngine):
    name = "lenient"

    def __init__(self, settings=None):
        super().__init__({k: v for k, v in dict(settings or {}).items() if k in type(self).Settings.model_fields})


def test_kit_names_a_settings_typo_that_is_not_refused(tmp_path):
    with pytest.raises(ConformanceError, match="engine 'lenient': settings typo 'conformance_typo' not refused"):
        check_engine(_LenientSettings, {}, tmp_path)


class _Renamed(LocalFactsheetPublisher):
    name = "renamed"


def test_kit_names_a_record_that_does_not_name_its_publisher(tmp_path):
    with pytest.raises(ConformanceError, match="record.publisher is 'local', not the component's name 'renamed'"):
        check_factsheet_publisher(_Renamed, {"directory": str(tmp_path / "factsheets")}, tmp_path)


class _InProcess(Engine):
    """Runs a workload in this process, so the careless targets below can live in this module."""

    name = "in-process"

    def run(self, workload, target, on_event, cancel=None):
        return execute(workload, on_event, cancel or threading.Event())


def careless_deploy(ctx):
    adapter = ctx.inputs["adapter"]
    return {"endpoint": EndpointRecord(uri="http://127.0.0.1:9", digest=adapter.digest, url="http://127.0.0.1:9",
                                       model_name=ctx.params["name"], protocols=(), serving=ctx.params["serving"],
                                       sources=(adapter,))}  # fmt: skip


class _Careless(ServingTarget):
    name = "careless"
    says: str = "careless"
    stops: bool = True

    def workload(self, adapter, endpoint_name):
        entry = f"{__name__}:careless_deploy"
        params = {"serving": self.says, "name": endpoint_name}
        return Workload(name="serve-endpoint", entrypoint=entry, inputs={"adapter": adapter}, params=params)

    def stop(self, endpoint):
        return self.stops


class _MisNamed(_Careless):
    says = "someone-else"


def test_kit_names_an_endpoint_record_that_does_not_name_its_target(tmp_path):
    with pytest.raises(ConformanceError, match="record.serving is 'someone-else', not the component's name 'careless'"):
        check_serving_target(_MisNamed, {}, tmp_path, engine=_InProcess())


def test_kit_names_a_second_stop_that_claims_to_stop_something(tmp_path):
    with pytest.raises(ConformanceError, match=r"serving target 'careless': stop\(\) after stop\(\) must return False"):
        check_serving_target(_Careless, {}, tmp_path, engine=_InProcess())


def test_kit_imports_no_plugin_and_no_orchestrator():
    import subprocess
    import sys

    code = ("import sys, aiplane.testing\n"
            "print(sorted(m for m in sys.modules if m.startswith(('aiplane.plugins', 'aiplane.assets', 'dagster'))))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_vllm_target_leaves_nothing_of_a_deploy_cancelled_while_its_server_starts(tmp_path):
    # Only the cancelled deploy: the base model has no weights, so the server never answers; the kit cancels
    # the deploy as soon as the server's process has left the deploy's group, then holds cleanup() to it.
    from aiplane.plugins.vllm.target import VllmLocal

    check_serving_target(VllmLocal, {"adapters": "lora"}, tmp_path, deploy=False)
