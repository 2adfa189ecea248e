"""Serve while training, from the start of ``aiplane up``: the serving target is told about the base model before
the sources run (``prestart_serving``), as the ``adapter_weights`` step tells it when training starts; and the
training loop leaves a core to what runs beside it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from aiplane.assets.resource import prestart_serving
from aiplane.core.components import ServingTarget
from aiplane.core.config import load_deployment
from aiplane.core.hookspecs import hookimpl
from aiplane.core.plugins import Registry, get_plugin_manager
from aiplane.core.workload import Workload


class _Hinted(ServingTarget):
    """Notes every prepare hint; deploys nothing."""

    name = "hinted"
    engines = ("local",)
    hints: list[tuple[str, str, str, threading.Thread]] = []

    def workload(self, adapter, endpoint_name: str) -> Workload:
        raise NotImplementedError

    def stop(self, endpoint) -> bool:
        return False

    def prepare(self, base_model, endpoint_name: str) -> None:
        _Hinted.hints.append((base_model.uri, base_model.digest, endpoint_name, threading.current_thread()))


class _Plugin:
    @hookimpl
    def aiplane_serving_targets(self):
        return [_Hinted]


@pytest.fixture
def hinted(tmp_path: Path):
    """A deployment of the built-in tiny Granite served by the hint-noting target, and its registry."""
    _Hinted.hints.clear()
    pm = get_plugin_manager()
    pm.register(_Plugin(), name="hinted")
    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    raw["serving"] = {"name": "hinted", "sla": raw["serving"].get("sla", "interactive")}
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, Registry(pm), tmp_path / "home"


def _built(path: Path, registry: Registry, home: Path):
    """The built-in base model, built as a first run's ``base_model`` step builds it; its record."""
    deployment = load_deployment(path, home=home)
    return registry.resolve_base_model(deployment.base_model.uri, str(deployment.home), deployment.storage.s3)


def test_up_gives_the_serving_target_the_base_model_the_run_resolves_in_a_thread_of_its_own(hinted):
    path, registry, home = hinted
    expected = _built(path, registry, home)
    deployment = load_deployment(path, home=home)
    thread = prestart_serving(deployment, registry)
    assert thread is not None and not thread.daemon  # a process ending meanwhile waits for the hint, then cleans up
    thread.join(120)
    ((uri, digest, endpoint, where),) = _Hinted.hints
    assert (uri, digest, endpoint) == (expected.uri, expected.digest, "support-tickets")
    assert where is thread


def test_a_regions_prestart_names_that_regions_endpoint(hinted):
    path, registry, home = hinted
    _built(path, registry, home)
    thread = prestart_serving(load_deployment(path, home=home), registry, region="eu")
    thread.join(120)
    assert [endpoint for _, _, endpoint, _ in _Hinted.hints] == ["support-tickets-eu"]


def test_a_built_in_model_no_run_has_built_yet_is_not_built_by_the_hint(hinted):
    path, registry, home = hinted
    # The first run's base_model step builds it (and says so if the disk is full): the hint writes no model.
    assert prestart_serving(load_deployment(path, home=home), registry) is None
    assert _Hinted.hints == [] and not (home / "models").exists()


def test_a_base_model_in_object_storage_is_left_to_the_training_steps_hint(hinted, tmp_path):
    path, registry, home = hinted
    raw = yaml.safe_load(path.read_text())
    raw["base_model"] = {"uri": "s3://models/granite-3.3-2b"}
    path.write_text(yaml.safe_dump(raw))
    assert prestart_serving(load_deployment(path, home=home), registry) is None  # nothing downloaded ahead
    assert _Hinted.hints == []


def test_a_base_model_that_cannot_be_resolved_costs_the_hint_and_raises_nothing(hinted, tmp_path):
    path, registry, home = hinted
    raw = yaml.safe_load(path.read_text())
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    # Weights on disk (the hint is tried), the config unreadable (resolving the model fails).
    import torch
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(broken / "model.safetensors"))
    raw["base_model"] = {"uri": str(broken)}
    path.write_text(yaml.safe_dump(raw))
    thread = prestart_serving(load_deployment(path, home=home), registry)
    thread.join(60)
    assert not thread.is_alive() and _Hinted.hints == []


def test_training_leaves_one_core_unless_omp_num_threads_says(monkeypatch):
    import os

    from aiplane.plugins.peft.train import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpu_threads() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert cpu_threads() == 1  # never none
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # as Ray sets it per worker
    assert cpu_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert cpu_threads() == 1
