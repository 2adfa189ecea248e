import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aiplane.core import Engine, hookimpl
from aiplane.core.config import Target
from aiplane.core.errors import PluginError
from aiplane.core.placement import Requirements, place
from aiplane.core.plugins import Registry, get_plugin_manager
from aiplane.core.workload import Workload

BUILTINS = {"local", "iceberg", "peft", "kserve", "factsheets", "openlineage", "ray", "kfp"}
EXAMPLE = Path(__file__).parents[1] / "examples" / "aiplane-example-cloud"


class _ThrowawayEngine(Engine):
    name = "throwaway"


class _ThrowawayPlugin:
    @hookimpl
    def aiplane_engines(self):
        return [_ThrowawayEngine]


def test_builtin_plugins_load_through_entry_points_with_distribution_and_hooks(clean_plugin_env):
    infos = {p.name: p for p in Registry().plugins()}
    assert BUILTINS <= set(infos)
    assert infos["local"].distribution == "aiplane" and infos["local"].version
    assert "aiplane_engines" in infos["local"].hooks
    assert "aiplane_resolve_base_model" in infos["peft"].hooks


def test_throwaway_plugin_registers_and_unregisters_on_a_fresh_manager(clean_plugin_env):
    pm = get_plugin_manager()
    plugin = _ThrowawayPlugin()
    pm.register(plugin, name="throwaway")
    try:
        registry = Registry(pm)
        assert isinstance(registry.engine("throwaway"), _ThrowawayEngine)
    finally:
        pm.unregister(plugin)
    with pytest.raises(PluginError, match="Unknown engine 'throwaway'"):
        Registry(pm).engine("throwaway")
    # A fresh manager never saw it.
    assert "throwaway" not in Registry().components("engine")


def test_allow_list_loads_only_named_plugins(monkeypatch):
    monkeypatch.delenv("AIPLANE_DISABLE_PLUGINS", raising=False)
    monkeypatch.setenv("AIPLANE_LOAD_PLUGINS", "local, peft")
    assert {p.name for p in Registry().plugins()} == {"local", "peft"}


def test_block_list_skips_named_plugins(monkeypatch):
    monkeypatch.delenv("AIPLANE_LOAD_PLUGINS", raising=False)
    monkeypatch.setenv("AIPLANE_DISABLE_PLUGINS", "kserve,openlineage")
    names = {p.name for p in Registry().plugins()}
    assert names == BUILTINS - {"kserve", "openlineage"}


def _fake_distribution(root: Path) -> None:
    dist = root / "broken_thing-1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-thing\nVersion: 1.2\n")
    (dist / "entry_points.txt").write_text("[aiplane]\nbroken = broken_thing_mod\nmisspelled = misspelled_mod\n")
    (root / "broken_thing_mod.py").write_text("raise ImportError('needs libfoo, which is not installed')\n")
    (root / "misspelled_mod.py").write_text(
        "from aiplane.core import hookimpl\n\n@hookimpl\ndef aiplane_engins():\n    return []\n"
    )


def test_broken_plugin_names_its_distribution_and_does_not_take_the_core_down(tmp_path, monkeypatch, caplog, clean_plugin_env):
    _fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="aiplane.plugins"):
        registry = Registry()
    broken = {b.name: b for b in registry.broken}
    assert set(broken) == {"broken", "misspelled"}
    assert broken["broken"].distribution == "broken-thing" and broken["broken"].version == "1.2"
    assert "needs libfoo" in broken["broken"].error
    assert "aiplane_engins" in broken["misspelled"].error
    assert "distribution broken-thing 1.2" in caplog.text
    # The core and the healthy plugins still work.
    assert BUILTINS <= {p.name for p in registry.plugins()}
    assert registry.engine("local").name == "local"
    with pytest.raises(PluginError, match=r"failed to load: broken \(broken-thing\)"):
        registry.engine("nope")


@pytest.fixture(scope="module")
def example_cloud(tmp_path_factory):
    """The example third-party distribution, pip-installed into its own directory."""
    target = tmp_path_factory.mktemp("site")
    # Build from a copy: an in-tree build would leave build/ and egg-info in examples/.
    source = shutil.copytree(EXAMPLE, tmp_path_factory.mktemp("src") / EXAMPLE.name)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
    )
    return target


def test_third_party_engine_is_listed_and_chosen_by_placement_without_core_changes(example_cloud, monkeypatch, clean_plugin_env, workload_path):
    monkeypatch.syspath_prepend(str(example_cloud))
    registry = Registry()
    info = {p.name: p for p in registry.plugins()}["example-cloud"]
    assert (info.distribution, info.version, info.hooks) == ("aiplane-example-cloud", "0.2.0", ("aiplane_engines",))

    targets = [
        Target(name="local", engine="local", region="eu"),
        Target(name="example-us-gpu", engine="example-cloud", region="us", gpus=1, settings={"project": "research"}),
    ]
    engines = registry.components("engine")
    decision = place(Requirements(workload="train", residency=("us",), gpus=1), targets, {"eu": ["eu"]}, engines)
    assert decision.target == "example-us-gpu"
    target = targets[1]
    result = registry.engine(target.engine, target.settings).run(
        Workload(name="echo", entrypoint="_workloads:echo", params={"name": "y"}), target, lambda e: None
    )
    assert result.engine == {"engine": "example-cloud", "target": "example-us-gpu", "project": "research"}
    assert result.outputs["out"].uri == "/tmp/y"
    # EU rows still never go there.
    decision = place(Requirements(workload="train", residency=("eu",)), targets, {"eu": ["eu"]}, engines)
    assert decision.target == "local"
    assert "outside the regions allowed" in decision.rejected["example-us-gpu"]


def test_aiplane_plugins_command_lists_the_example_plugin(example_cloud):
    out = subprocess.run(
        [sys.executable, "-m", "aiplane.assets.cli", "plugins"],
        env={"PYTHONPATH": str(example_cloud), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    ).stdout
    assert "example-cloud  aiplane-example-cloud-0.2.0  aiplane_engines" in out
    assert "local" in out


def test_unknown_names_in_plugin_lists_warn_with_a_suggestion(monkeypatch, caplog):
    monkeypatch.setenv("AIPLANE_LOAD_PLUGINS", "lcoal,peft")
    monkeypatch.delenv("AIPLANE_DISABLE_PLUGINS", raising=False)
    with caplog.at_level(logging.WARNING, logger="aiplane.plugins"):
        names = {p.name for p in Registry().plugins()}
    assert names == {"peft"}
    assert "AIPLANE_LOAD_PLUGINS names Unknown plugin 'lcoal'" in caplog.text
    assert "Did you mean 'local'?" in caplog.text


def test_two_plugins_providing_the_same_component_name_is_an_error(clean_plugin_env):
    class Impostor(Engine):
        name = "local"

    class ImpostorPlugin:
        @hookimpl
        def aiplane_engines(self):
            return [Impostor]

    pm = get_plugin_manager()
    pm.register(ImpostorPlugin(), name="impostor")
    with pytest.raises(PluginError, match="Two plugins provide the engine 'local': plugin 'impostor' and plugin 'local'"):
        Registry(pm).engine("local")


def test_trace_switch_logs_every_hook_call(monkeypatch, clean_plugin_env):
    monkeypatch.setenv("AIPLANE_TRACE_HOOKS", "1")
    code = "from aiplane.core.plugins import Registry; Registry().components('engine')"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "hook aiplane_engines() -> " in err and "local" in err
    assert "hook aiplane_engines returned" in err


def test_base_model_uris_nobody_resolves_or_missing_paths_are_clear_errors(tmp_path, clean_plugin_env):
    from aiplane.core.errors import InputError

    registry = Registry()
    with pytest.raises(InputError, match="Base model 'hf://ibm-granite/granite-3.3-2b-instruct' not found.*local directory"):
        registry.resolve_base_model("hf://ibm-granite/granite-3.3-2b-instruct", str(tmp_path))
    with pytest.raises(InputError, match="Base model path .*/nope' does not exist"):
        registry.resolve_base_model(str(tmp_path / "nope"), str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_a_failing_observer_neither_fails_the_asset_nor_hides_its_error(tmp_path, caplog, clean_plugin_env):
    from aiplane.core.config import load_deployment
    from aiplane.core.plugins import materialization

    seen = []

    class Broken:
        @hookimpl
        def aiplane_before_materialize(self, asset):
            raise RuntimeError("observer bug")

        @hookimpl
        def aiplane_on_materialize_error(self, asset, error):
            raise RuntimeError("observer bug on error")

    class Watcher:
        @hookimpl
        def aiplane_on_materialize_error(self, asset, error):
            seen.append((asset, str(error)))

    pm = get_plugin_manager()
    pm.register(Broken(), name="broken-observer")
    pm.register(Watcher(), name="watcher")
    deployment = load_deployment("local", home=tmp_path)
    with caplog.at_level(logging.WARNING, logger="aiplane.plugins"):
        with pytest.raises(ValueError, match="the real failure"):
            with materialization(pm, "features", "run-1", [], deployment):
                raise ValueError("the real failure")
    assert seen == [("features", "the real failure")]
    assert "observer 'broken-observer' failed in aiplane_before_materialize" in caplog.text
    assert "observer 'broken-observer' failed in aiplane_on_materialize_error" in caplog.text
