import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from aiplane.core import Engine, hookimpl
from aiplane.core.config import Target
from aiplane.core.errors import ConfigError, PluginError
from aiplane.core.placement import Requirements, place
from aiplane.core.plugins import Registry, get_plugin_manager
from aiplane.core.workload import Workload

BUILTINS = {"local", "iceberg", "peft", "kserve", "llmisvc", "vllm", "factsheets", "watsonx_gov", "openlineage", "ray",
            "kfp", "k8s", "trainjob", "model_registry"}


class _ThrowawayEngine(Engine):
    name = "throwaway"

    def run(self, workload, target, on_event, cancel=None):
        raise NotImplementedError("only looked up, never run")


class _ThrowawayPlugin:
    @hookimpl
    def aiplane_engines(self):
        return [_ThrowawayEngine]


def test_builtin_plugins_load_through_entry_points_with_distribution_hooks_and_components(clean_plugin_env):
    infos = {p.name: p for p in Registry().plugins()}
    assert set(infos) >= BUILTINS
    assert not any(p.disabled_by for p in infos.values())
    assert infos["local"].distribution == "aiplane" and infos["local"].version
    assert "aiplane_engines" in infos["local"].hooks
    assert "aiplane_resolve_base_model" in infos["peft"].hooks
    assert infos["local"].components == (("engine", "local"),)
    assert infos["iceberg"].components == (("feature store", "iceberg"), ("feature store", "watsonx-data"))
    assert infos["peft"].components == (("trainer", "lora"), ("trainer", "sft"), ("trainer", "distill"))
    assert infos["openlineage"].components == ()  # an observer: hooks only
    assert infos["llmisvc"].components == (("serving target", "kserve-llm"),)


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


def _loaded(registry: Registry) -> set[str]:
    return {p.name for p in registry.plugins() if not p.disabled_by}


def test_allow_list_loads_only_named_plugins(monkeypatch):
    monkeypatch.delenv("AIPLANE_DISABLE_PLUGINS", raising=False)
    monkeypatch.setenv("AIPLANE_LOAD_PLUGINS", "local, peft")
    registry = Registry()
    assert _loaded(registry) == {"local", "peft"}
    assert {name for name, _ in registry.pm.list_name_plugin()} == {"local", "peft"}


def test_block_list_skips_named_plugins(monkeypatch):
    monkeypatch.delenv("AIPLANE_LOAD_PLUGINS", raising=False)
    monkeypatch.setenv("AIPLANE_DISABLE_PLUGINS", "kserve,openlineage")
    registry = Registry()
    assert _loaded(registry) == BUILTINS - {"kserve", "openlineage"}
    assert not registry.pm.has_plugin("kserve") and not registry.pm.has_plugin("openlineage")


def test_disabled_plugins_are_listed_as_disabled_with_what_they_would_provide(monkeypatch):
    monkeypatch.delenv("AIPLANE_LOAD_PLUGINS", raising=False)
    monkeypatch.setenv("AIPLANE_DISABLE_PLUGINS", "kserve")
    infos = {p.name: p for p in Registry().plugins()}
    assert infos["kserve"].disabled_by == "AIPLANE_DISABLE_PLUGINS"
    assert infos["kserve"].components == (("serving target", "kserve"),)
    assert infos["kserve"].distribution == "aiplane" and infos["kserve"].hooks == ("aiplane_serving_targets",)
    assert infos["local"].disabled_by is None

    monkeypatch.delenv("AIPLANE_DISABLE_PLUGINS")
    monkeypatch.setenv("AIPLANE_LOAD_PLUGINS", "local")
    infos = {p.name: p for p in Registry().plugins()}
    assert set(infos) >= BUILTINS
    assert {name for name, p in infos.items() if p.disabled_by == "AIPLANE_LOAD_PLUGINS"} >= BUILTINS - {"local"}


def test_a_disabled_plugins_component_is_reported_as_disabled_with_how_to_enable_it(monkeypatch):
    monkeypatch.delenv("AIPLANE_LOAD_PLUGINS", raising=False)
    monkeypatch.setenv("AIPLANE_DISABLE_PLUGINS", "peft")
    with pytest.raises(PluginError) as err:
        Registry().create("trainer", "lora")
    assert str(err.value) == (
        "The trainer 'lora' comes from plugin 'peft', which is disabled: "
        "AIPLANE_DISABLE_PLUGINS names it. Remove 'peft' from AIPLANE_DISABLE_PLUGINS to use it."
    )

    monkeypatch.delenv("AIPLANE_DISABLE_PLUGINS")
    monkeypatch.setenv("AIPLANE_LOAD_PLUGINS", "local")
    disabled = "The engine 'ray' comes from plugin 'ray', which is disabled: .*Add 'ray' to AIPLANE_LOAD_PLUGINS"
    with pytest.raises(PluginError, match=disabled):
        Registry().engine("ray")
    # A name no plugin provides, loaded or disabled, is still just unknown.
    with pytest.raises(PluginError, match=r"^Unknown engine 'rya'; installed engines: local\.$"):
        Registry().engine("rya")


class _Retry(BaseModel):  # no extra="forbid", as a plugin author may well write it
    attempts: int = 1


class _LaxEngine(_ThrowawayEngine):
    name = "lax"

    class Settings(BaseModel):  # no extra="forbid" either
        queue: str = "default"
        retry: _Retry = _Retry()


class _LaxPlugin:
    @hookimpl
    def aiplane_engines(self):
        return [_LaxEngine]


def test_unknown_settings_are_rejected_even_when_the_plugins_model_would_ignore_them(clean_plugin_env):
    pm = get_plugin_manager(entry_points=False)
    plugin = _LaxPlugin()
    pm.register(plugin, name="lax")
    try:
        registry = Registry(pm)
        with pytest.raises(ConfigError) as err:
            registry.engine("lax", {"qeue": "gold"})
        assert "qeue: Unknown setting 'qeue'; allowed settings: queue, retry. Did you mean 'queue'?" in str(err.value)
        with pytest.raises(ConfigError) as err:
            registry.engine("lax", {"queue": "gold", "retry": {"atempts": 3}})
        assert "retry.atempts: Unknown setting 'atempts'; allowed settings: attempts. Did you mean 'attempts'?" in str(err.value)
        engine = registry.engine("lax", {"queue": "gold", "retry": {"attempts": 3}})
        assert (engine.settings.queue, engine.settings.retry.attempts) == ("gold", 3)
    finally:
        pm.unregister(plugin)


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
    assert {p.name for p in registry.plugins()} >= BUILTINS
    assert registry.engine("local").name == "local"
    with pytest.raises(PluginError, match=r"failed to load: broken \(broken-thing\)"):
        registry.engine("nope")


def test_third_party_engine_is_listed_and_chosen_by_placement_without_core_changes(
    example_cloud, monkeypatch, clean_plugin_env, workload_path
):
    monkeypatch.syspath_prepend(str(example_cloud))
    registry = Registry()
    info = {p.name: p for p in registry.plugins()}["example-cloud"]
    assert (info.distribution, info.version, info.hooks) == ("aiplane-example-cloud", "0.2.0", ("aiplane_engines",))

    targets = [
        Target(name="local", engine="local", region="eu"),
        Target(name="example-us-gpu", engine="example-cloud", region="us", gpus=1, settings={"project": "research"}),
    ]
    engines = registry.components("engine")
    decision = place(Requirements(workload="train", residency=("us",), gpus=1), targets, {"eu": ["eu"], "us": "any"}, engines)
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


def test_aiplane_plugins_command_lists_components_and_disabled_plugins(example_cloud):
    out = subprocess.run(
        [sys.executable, "-m", "aiplane.assets.cli", "plugins"],
        env={"PYTHONPATH": str(example_cloud), "PATH": "/usr/bin:/bin", "AIPLANE_DISABLE_PLUGINS": "kserve"},
        capture_output=True, text=True, check=True,
    ).stdout
    lines = out.splitlines()
    i = lines.index("example-cloud  aiplane-example-cloud-0.2.0  aiplane_engines")
    assert lines[i + 1].split() == ["provides", "engine", "'example-cloud'"]
    kserve = next(n for n, line in enumerate(lines) if line.startswith("kserve "))
    assert lines[kserve].endswith("aiplane_serving_targets  DISABLED: AIPLANE_DISABLE_PLUGINS names it")
    assert lines[kserve + 1].split() == ["provides", "serving", "target", "'kserve'"]
    assert any(line.split() == ["provides", "trainer", "'lora',", "trainer", "'sft',", "trainer", "'distill'"] for line in lines)


def test_unknown_names_in_plugin_lists_warn_with_a_suggestion(monkeypatch, caplog):
    monkeypatch.setenv("AIPLANE_LOAD_PLUGINS", "lcoal,peft")
    monkeypatch.delenv("AIPLANE_DISABLE_PLUGINS", raising=False)
    with caplog.at_level(logging.WARNING, logger="aiplane.plugins"):
        names = _loaded(Registry())
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


def test_lifecycle_hooks_go_through_pluggy_one_observer_at_a_time(tmp_path, caplog, clean_plugin_env):
    """Monitoring (what AIPLANE_TRACE_HOOKS uses) sees every observer's call, tryfirst applies, a failure stays local."""
    from aiplane.core.config import load_deployment
    from aiplane.core.plugins import materialization
    from aiplane.core.records import BaseModelRecord

    ran = []

    class Broken:
        @hookimpl
        def aiplane_after_materialize(self, asset):
            raise RuntimeError("observer bug")

    class Early:
        @hookimpl(tryfirst=True)
        def aiplane_before_materialize(self, asset):
            ran.append(("early", asset))

        @hookimpl(tryfirst=True)
        def aiplane_on_materialize_error(self, asset, error):
            ran.append(("early", str(error)))

    class Late:
        @hookimpl
        def aiplane_before_materialize(self, asset):
            ran.append(("late", asset))

        @hookimpl
        def aiplane_after_materialize(self, asset, output):
            ran.append(("late", output.name))

        @hookimpl
        def aiplane_on_materialize_error(self, asset, error):
            ran.append(("late", str(error)))

    pm = get_plugin_manager(entry_points=False)
    # Registered last, so without tryfirst pluggy would call Late before Early.
    for plugin, name in ((Early(), "early"), (Broken(), "broken"), (Late(), "late")):
        pm.register(plugin, name=name)
    seen = []
    pm.add_hookcall_monitoring(
        lambda hook, impls, kwargs: None,
        lambda outcome, hook, impls, kwargs: seen.append(
            (hook, tuple(i.plugin_name for i in impls), type(outcome.exception).__name__ if outcome.exception else None)
        ),
    )
    deployment = load_deployment("local", home=tmp_path)
    record = BaseModelRecord(uri="/m", digest="sha256:0", name="m", architecture="a", parameters=1)
    with caplog.at_level(logging.WARNING, logger="aiplane.plugins"):
        with materialization(pm, "base_model", "run-1", [], deployment) as holder:
            holder["output"] = record
        with pytest.raises(ValueError):
            with materialization(pm, "features", "run-2", [], deployment):
                raise ValueError("the real failure")

    assert seen == [
        ("aiplane_before_materialize", ("early",), None),
        ("aiplane_before_materialize", ("late",), None),
        ("aiplane_after_materialize", ("late",), None),
        ("aiplane_after_materialize", ("broken",), "RuntimeError"),
        ("aiplane_before_materialize", ("early",), None),
        ("aiplane_before_materialize", ("late",), None),
        ("aiplane_on_materialize_error", ("early",), None),
        ("aiplane_on_materialize_error", ("late",), None),
    ]
    assert ran == [
        ("early", "base_model"), ("late", "base_model"), ("late", "m"),
        ("early", "features"), ("late", "features"), ("early", "the real failure"), ("late", "the real failure"),
    ]  # fmt: skip
    assert "observer 'broken' failed in aiplane_after_materialize and was skipped: RuntimeError: observer bug" in caplog.text


def test_trace_switch_logs_every_observer_call(tmp_path, clean_plugin_env):
    code = (
        "from aiplane.core.config import load_deployment\n"
        "from aiplane.core.plugins import get_plugin_manager, materialization\n"
        "from aiplane.core.records import BaseModelRecord\n"
        f"d = load_deployment('local', home={str(tmp_path)!r})\n"
        "with materialization(get_plugin_manager(), 'base_model', 'run-1', [], d) as m:\n"
        "    m['output'] = BaseModelRecord(uri='/m', digest='sha256:0', name='m', architecture='a', parameters=1)\n"
    )
    env = {**os.environ, "AIPLANE_TRACE_HOOKS": "1", "AIPLANE_LOAD_PLUGINS": "openlineage"}
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stderr
    assert "hook aiplane_before_materialize(asset, run_id, inputs, deployment, region) -> openlineage" in err
    assert "hook aiplane_after_materialize(asset, run_id, inputs, deployment, region, output) -> openlineage" in err
    assert "hook aiplane_after_materialize returned" in err


def test_no_plugin_imports_another_plugin():
    """What two plugins share lives in core/ or behind a hook; a plugin module naming another plugin fails here."""
    import ast

    import aiplane.plugins

    root = Path(aiplane.plugins.__file__).parent
    crossing = []
    for path in sorted(root.rglob("*.py")):
        own = path.relative_to(root).parts[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[:2] == ["aiplane", "plugins"] and len(parts) > 2 and parts[2] != own:
                    crossing.append(f"{path.relative_to(root.parent)}:{node.lineno} imports {name}")
    assert crossing == []


class _Echo(BaseModel):
    model_config = {"extra": "forbid"}
    scale: float = 1.0


def _echo_evaluator():
    from aiplane.core.evaluation import Evaluator

    class Echo(Evaluator):
        name = "echo"
        Settings = _Echo

        def metrics(self):
            return ["eval_echo_len"]

        def evaluate(self, rows, predictions, ctx):
            return {"eval_echo_len": self.settings.scale * sum(map(len, predictions)) / len(predictions)}

    class Plugin:
        @hookimpl
        def aiplane_evaluators(self):
            return [Echo]

    return Plugin()


def test_an_evaluator_a_plugin_provides_is_chosen_by_name_and_adds_its_metrics(clean_plugin_env):
    from aiplane.core.evaluation import evaluate, evaluation_metrics, evaluation_settings

    pm = get_plugin_manager()
    pm.register(_echo_evaluator(), name="echo")
    settings = evaluation_settings({"echo": {"scale": 2.0}}, pm)
    assert evaluation_metrics(settings) == ["eval_echo_len"]
    assert evaluate(settings, [{"prompt": "a"}, {"prompt": "b"}], ["abc", "a"], ctx=None) == {"eval_echo_len": 4.0}
    assert settings.model_dump()["echo"] == {"scale": 2.0} and settings.watsonx_gov is None
    with pytest.raises(ValueError, match=r"Unknown evaluator 'ecko'; installed evaluators: echo, watsonx_gov\. Did you mean 'echo'\?"):
        evaluation_settings({"ecko": {}}, pm)
    with pytest.raises(ValueError, match=r"echo\.scal\b"):
        evaluation_settings({"echo": {"scal": 2}}, pm)
    # Without the plugin, the name is unknown: the trainer's settings say so before anything runs.
    from aiplane.plugins.peft.trainer import LoraTrainer

    with pytest.raises(ConfigError, match="evaluation: Unknown evaluator 'echo'"):
        LoraTrainer({"r": 8, "alpha": 16, "target_modules": ["q_proj"], "max_steps": 2, "batch_size": 2, "seq_len": 32,
                     "learning_rate": 1e-3, "evaluation": {"echo": {}}})  # fmt: skip
