"""The ``aiplane`` command as a user runs it: a fresh process, its exit code, what it prints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aiplane.assets.sources import seed_tickets
from aiplane.core.config import load_deployment
from aiplane.plugins.vllm._server import servers_dir
from conftest import stop_endpoints

TINY_TRAINING = {"max_steps": 12, "batch_size": 4, "seq_len": 64, "eval_limit": 8, "log_every": 4}


def _deployment(home: Path, trainer: dict | None = None, **top) -> Path:
    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    raw["trainer"]["settings"].update(trainer or {})
    raw.update(top)
    path = home / "deployment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "AIPLANE_DEPLOYMENT", "AIPLANE_DEBUG")}
    # Workload temp dirs land in the test's own TMPDIR, so leftovers can be seen.
    (home / "tmp").mkdir(exist_ok=True)
    return {**env, "AIPLANE_HOME": str(home), "PYTHONUNBUFFERED": "1", "TMPDIR": str(home / "tmp")}


def aiplane(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "aiplane.assets.cli", "--deployment", str(home / "deployment.yaml"), *args]
    return subprocess.run(cmd, env=_env(home), cwd=home, capture_output=True, text=True, timeout=timeout)


def test_check_lists_every_problem_at_once_and_changes_nothing(tmp_path):
    _deployment(tmp_path, trainer={"qeue": "gold", "target_modules": ["q_proj", "qq_proj"]})
    out = aiplane(tmp_path, "check", "--train-target", "kfp-locl")
    assert out.returncode == 1, out.stderr
    assert "Unknown setting 'qeue'" in out.stderr
    assert "pinned to target 'kfp-locl', which does not exist" in out.stderr and "Did you mean 'kfp-local'" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployment.yaml", "tmp"], "check must have no side effects"


def test_check_finds_target_modules_the_model_lacks_before_the_model_is_built(tmp_path):
    _deployment(tmp_path, trainer={"target_modules": ["q_proj", "qq_proj"]})
    out = aiplane(tmp_path, "check")
    assert out.returncode == 1
    assert "'qq_proj' does not match any module of base model 'builtin:tiny-granite'" in out.stderr
    assert not (tmp_path / "models").exists()


def test_up_with_an_unknown_trainer_setting_names_the_key_exits_1_and_prints_no_traceback(tmp_path):
    _deployment(tmp_path, trainer={"qeue": "gold"})
    out = aiplane(tmp_path, "up")
    assert out.returncode == 1
    assert "Unknown setting 'qeue'" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stderr.rstrip().splitlines()[0].startswith("error: ")
    assert not (tmp_path / "iceberg").exists() and not (tmp_path / "models").exists()


def test_a_refused_deployment_starts_no_training_worker(tmp_path, monkeypatch):
    from aiplane.assets import cli, resource

    started = []
    monkeypatch.setattr(resource, "prestart_training", lambda *a, **k: started.append(a))
    monkeypatch.setenv("AIPLANE_HOME", str(tmp_path))
    _deployment(tmp_path, trainer={"qeue": "gold"})
    assert cli.main(["--deployment", str(tmp_path / "deployment.yaml"), "up"]) == 1
    assert started == [], "the worker is prestarted only once the preflight has passed"


@pytest.fixture
def full_disk_home(tmp_path):
    """A home on a 2 MiB filesystem of its own: too small for the base model. Needs root to mount (CI runs as root)."""
    home = tmp_path / "home"
    home.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(home)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield home
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def test_a_full_disk_under_the_home_fails_the_run_saying_so_and_what_to_do_and_publishes_nothing(full_disk_home, tmp_path):
    deployment = _deployment(tmp_path)
    env = {**_env(tmp_path), "AIPLANE_HOME": str(full_disk_home)}
    cmd = [sys.executable, "-m", "aiplane.assets.cli", "--deployment", str(deployment), "up"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: ") and "No space left on device" in last and "Free space there" in last, last
    assert "Traceback" not in out.stderr
    artifacts = full_disk_home / "artifacts"
    assert not (artifacts.exists() and list(artifacts.rglob("*.complete"))), "nothing counts as published"
    assert not (full_disk_home / "serving").exists()


def test_up_with_debug_shows_the_traceback(tmp_path):
    _deployment(tmp_path, trainer={"qeue": "gold"})
    out = aiplane(tmp_path, "--debug", "up")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "Unknown setting 'qeue'" in out.stderr


def test_a_failure_inside_the_run_prints_aiplanes_message_once_and_last(tmp_path):
    _deployment(tmp_path)
    seed_tickets(tmp_path / "sources" / "tickets.jsonl", n=60)
    rows = [json.loads(line) for line in (tmp_path / "sources" / "tickets.jsonl").read_text().splitlines()]
    rows[3]["region"] = "mars"
    (tmp_path / "sources" / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = aiplane(tmp_path, "up")
    assert out.returncode == 1
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: features: check residency_known failed: 1 row(s) are tagged 'mars'")
    assert out.stderr.count("row(s) are tagged 'mars'") == 1
    assert "Stack Trace" not in out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "artifacts").exists()


def test_up_with_an_adapter_that_fails_the_governance_gate_says_why_exits_1_and_serves_nothing(tmp_path):
    _deployment(tmp_path, trainer=TINY_TRAINING, governance={"thresholds": {"eval_accuracy": 1.01}})
    out = aiplane(tmp_path, "up")
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-3:]
    assert any("governance_gate" in line and "below the minimum 1.01" in line for line in last), last
    assert "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "serving").exists() and not (tmp_path / "factsheets").exists()


def test_usage_errors_exit_2():
    out = subprocess.run([sys.executable, "-m", "aiplane.assets.cli", "up", "--no-such-flag"], capture_output=True, text=True)
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr


def _lineage(home: Path) -> list[dict]:
    path = home / "lineage" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    """A home where `aiplane up` was killed with SIGKILL while training, then run again to completion."""
    home = tmp_path_factory.mktemp("home")
    _deployment(home, trainer=TINY_TRAINING)
    seed_tickets(home / "sources" / "tickets.jsonl", n=400)
    cmd = [sys.executable, "-m", "aiplane.assets.cli", "--deployment", str(home / "deployment.yaml"), "up"]
    killed = subprocess.Popen(cmd, env=_env(home), cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(
            lambda: any(e["job"]["name"] == "adapter_weights" and e["eventType"] == "START" for e in _lineage(home)),
            300, "training to start",
        )  # fmt: skip
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    second = aiplane(home, "up")
    try:
        yield {"home": home, "second": second}
    finally:
        stop_endpoints(home)


def aiplane_up(home: Path) -> subprocess.CompletedProcess:
    return aiplane(home, "up")


def test_after_a_killed_up_the_next_up_fails_the_orphaned_run_closes_its_lineage_and_cleans_up(recovered):
    home, second = recovered["home"], recovered["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    marked = [line for line in second.stderr.splitlines() if line.startswith("Marked run ")]
    assert len(marked) == 1, second.stderr[-3000:]
    orphan = marked[0].split()[2]
    from aiplane.plugins.openlineage.naming import run_uuid

    training = run_uuid(orphan, "adapter_weights")
    states = [e["eventType"] for e in _lineage(home) if e["run"]["runId"] == training]
    assert states == ["START", "FAIL"], "the orphaned training step's lineage START got its FAIL"
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        assert instance.get_run_by_id(orphan).status == dg.DagsterRunStatus.FAILURE
    assert list((home / "tmp").iterdir()) == [], "the killed run's workload temp dirs were removed"
    assert "adapter_weights" in second.stdout and "Endpoint:" in second.stdout


def test_up_trains_in_the_worker_it_started_while_checking_and_refreshing_the_sources(recovered):
    import dagster as dg

    with dg.DagsterInstance.from_config(str(recovered["home"] / "dagster")) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("adapter_weights"))
    execution = event.asset_materialization.metadata["execution"].value
    assert execution["engine"] == "local" and execution["prestarted"] is True, execution


def test_a_second_up_with_nothing_changed_materializes_nothing_new_and_keeps_the_url(recovered):
    home, second = recovered["home"], recovered["second"]
    third = aiplane_up(home)
    assert third.returncode == 0, third.stderr[-3000:]
    for asset in ("adapter_weights", "served_endpoint", "factsheet"):
        assert f"{asset:16} up to date" in third.stdout, third.stdout
    url = [line for line in second.stdout.splitlines() if line.startswith("Endpoint:")]
    assert url and url == [line for line in third.stdout.splitlines() if line.startswith("Endpoint:")]


def _endpoint_state(home: Path) -> dict:
    state = json.loads((home / "serving" / "support-tickets" / "endpoint.json").read_text())
    (server,) = servers_dir(home).glob("*/server.json")
    return {**state, "pid": json.loads(server.read_text())["pid"]}


EVERYTHING = ["base_model", "features", "adapter_weights", "served_endpoint", "factsheet"]


def _definitions(home: Path):
    from aiplane.assets import AiplaneResource, build_definitions

    return build_definitions(AiplaneResource(deployment=str(home / "deployment.yaml"), home=str(home)))


def _requested(result) -> set[str]:
    import dagster as dg

    return {k for k in EVERYTHING if result.get_requested_partitions(dg.AssetKey(k))}


@pytest.fixture(scope="module")
def retrained(recovered):
    """The recovered home after a trainer setting changed (another seed): what Dagster, its automation and
    ``stale`` say of the change, then two ``aiplane up`` at once on the home, the first of which trains and deploys
    the new adapter while the second waits for it. One retraining (and one new adapter's swap on the running
    server) shared by the tests that check the change's staleness, the second up's wait and the swap."""
    import dagster as dg

    from aiplane.assets.state import stale
    from aiplane.core.homelock import holder_of

    home = recovered["home"]
    facts: dict = {"endpoint_before": _endpoint_state(home)}
    facts["trained_before"] = len(
        [e for e in _lineage(home) if e["job"]["name"] == "adapter_weights" and e["eventType"] == "COMPLETE"]
    )
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        # Identical settings: what Dagster and its automation say, tick after tick.
        unchanged = _definitions(home)
        first = dg.evaluate_automation_conditions(defs=unchanged, instance=instance)
        settled = dg.evaluate_automation_conditions(defs=unchanged, instance=instance, cursor=first.cursor)
        facts["requested_unchanged"] = (_requested(first), _requested(settled))
        facts["stale_unchanged"] = stale(instance, unchanged, EVERYTHING)
        _deployment(home, trainer={**TINY_TRAINING, "seed": 1})
        changed = _definitions(home)
        facts["stale_changed"] = stale(instance, changed, EVERYTHING)
        facts["requested_changed"] = _requested(
            dg.evaluate_automation_conditions(defs=changed, instance=instance, cursor=settled.cursor)
        )
    cmd = [sys.executable, "-m", "aiplane.assets.cli", "--deployment", str(home / "deployment.yaml"), "up"]
    first_up = subprocess.Popen(cmd, env=_env(home), cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (holder_of(home) or "").startswith(f"pid {first_up.pid} "), 120, "the first up to hold the home")
        second_up = aiplane_up(home)
        first_out, first_err = first_up.communicate(timeout=600)
    finally:
        first_up.kill()
    facts.update(first=first_up, first_out=first_out, first_err=first_err, second=second_up)
    facts["trained_after"] = len(
        [e for e in _lineage(home) if e["job"]["name"] == "adapter_weights" and e["eventType"] == "COMPLETE"]
    )
    facts["endpoint_after"] = _endpoint_state(home) if first_up.returncode == 0 else None
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        facts["stale_after"] = stale(instance, _definitions(home), EVERYTHING)
        # Each materialization names the plugins that did the work, as top-level metadata.
        facts["made_by"] = {
            key: {k: v.value for k, v in instance.get_latest_materialization_event(dg.AssetKey(key)).asset_materialization.metadata.items()}
            for key in EVERYTHING[1:]
        }
    return facts


def test_a_changed_trainer_setting_is_stale_in_dagster_requested_by_automation_and_redone_by_up_alike(retrained):
    redone = set(EVERYTHING[2:])
    # Identical settings: nothing is stale, and the automation requests nothing, tick after tick.
    assert retrained["requested_unchanged"] == (set(), set())
    assert retrained["stale_unchanged"] == {}
    # (a) Dagster's own stale status: the adapter, for its new code version; nothing upstream of it.
    assert retrained["stale_changed"] == {"adapter_weights": "its deployment settings changed (a new code version)"}
    # (b) The automation requests the adapter and what reads it, in one tick.
    assert retrained["requested_changed"] == redone
    # (c) `aiplane up` redoes exactly those.
    up, out = retrained["first"], retrained["first_out"]
    assert up.returncode == 0, retrained["first_err"][-3000:]
    assert {a for a in EVERYTHING if f"{a:16} materialized" in out} == redone, out
    assert retrained["stale_after"] == {}
    made_by = retrained["made_by"]
    assert made_by["features"]["feature store"] == "iceberg"
    assert (made_by["adapter_weights"]["trainer"], made_by["adapter_weights"]["engine"]) == ("lora", "local")
    assert made_by["served_endpoint"]["serving target"] == "vllm" and made_by["factsheet"]["publisher"] == "local"


def test_two_ups_at_once_on_one_home_train_once_and_the_second_finds_the_work_done(retrained):
    first, second = retrained["first"], retrained["second"]
    assert first.returncode == 0 and second.returncode == 0, (retrained["first_err"][-2000:], second.stderr[-2000:])
    assert f"in use by pid {first.pid} (aiplane up)" in second.stderr and "waiting for it to finish" in second.stderr
    assert f"{'adapter_weights':16} materialized" in retrained["first_out"], retrained["first_out"]
    for asset in ("adapter_weights", "served_endpoint", "factsheet"):
        assert f"{asset:16} up to date" in second.stdout, second.stdout
    assert retrained["trained_after"] == retrained["trained_before"] + 1, "the two ups trained once between them"


def test_a_new_adapter_takes_over_the_running_server_and_rollback_brings_the_one_before_back(recovered, retrained):
    home = recovered["home"]
    first = retrained["endpoint_before"]
    assert retrained["first"].returncode == 0, retrained["first_err"][-3000:]
    second = retrained["endpoint_after"]
    assert second["current"] != first["current"]
    assert (second["url"], second["pid"]) == (first["url"], first["pid"]), "same server, same URL, no restart"

    back = aiplane(home, "rollback")
    assert back.returncode == 0, back.stderr[-3000:]
    assert f"adapter {second['current']} -> {first['current']}" in back.stdout
    after = _endpoint_state(home)
    assert (after["current"], after["url"], after["pid"]) == (first["current"], first["url"], first["pid"])
    # Recorded like any deploy: in the factsheet, and as the served endpoint's input in the lineage.
    document = json.loads((home / "factsheets" / "latest.json").read_text())
    assert document["endpoint"]["execution"]["rollback"] == {"to": first["current"], "from": second["current"]}
    assert document["adapter"]["digest"] == first["current"]
    served = [e for e in _lineage(home) if e["job"]["name"] == "served_endpoint" and e["eventType"] == "COMPLETE"][-1]
    assert [i["facets"]["version"]["datasetVersion"] for i in served["inputs"]] == [first["current"]]
    # It stays: nothing upstream changed, so the next `up` leaves the rolled-back adapter serving.
    again = aiplane_up(home)
    assert again.returncode == 0 and f"{'served_endpoint':16} up to date" in again.stdout, again.stdout
    assert _endpoint_state(home)["current"] == first["current"]


def test_rollback_to_an_adapter_never_trained_here_names_the_ones_that_were(recovered):
    out = aiplane(recovered["home"], "rollback", "--to", "0123456789abcdef")
    assert out.returncode == 1 and "names no adapter this instance has trained" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_dagster_instance_aiplane_creates_sends_no_telemetry(tmp_path, monkeypatch):
    from aiplane.assets.instance import open_instance

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    with open_instance(tmp_path) as instance:
        assert instance.telemetry_enabled is False
        assert instance.run_monitoring_enabled


def test_dagster_loads_the_code_location_with_dash_m_from_any_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "aiplane.assets"],
        cwd=tmp_path, env={**env, "AIPLANE_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Validation successful for code location aiplane.assets" in out.stderr + out.stdout


def test_sigterm_during_training_says_terminated_stops_the_run_and_exits_143(tmp_path):
    _deployment(tmp_path, trainer={**TINY_TRAINING, "max_steps": 5000})
    seed_tickets(tmp_path / "sources" / "tickets.jsonl", n=200)
    cmd = [sys.executable, "-m", "aiplane.assets.cli", "--deployment", str(tmp_path / "deployment.yaml"), "up"]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(
            lambda: any(e["job"]["name"] == "adapter_weights" for e in _lineage(tmp_path)), 300, "training to start"
        )
        # What a service manager or Kubernetes sends; during a run Dagster treats it as Ctrl-C, and aiplane says which.
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert err.rstrip().splitlines()[-1].startswith("aiplane: terminated (SIGTERM)")
    assert "Traceback" not in err
    assert [e["eventType"] for e in _lineage(tmp_path) if e["job"]["name"] == "adapter_weights"] == ["START", "FAIL"]


def test_an_endpoint_served_by_a_target_no_longer_installed_is_served_anew(tmp_path):
    import dagster as dg

    from aiplane.assets.up import endpoint_down
    from aiplane.core.plugins import Registry
    from aiplane.core.records import EndpointRecord, record_to_json

    # What a home served by the retired kserve-local target recorded.
    old = EndpointRecord(
        uri="http://127.0.0.1:1", digest="sha256:e", url="http://127.0.0.1:1", model_name="support-tickets",
        protocols=("kserve-v2", "openai-completions"), serving="kserve-local", handle={"pid": 1},
    )
    instance = dg.DagsterInstance.ephemeral()
    instance.report_runless_asset_event(
        dg.AssetMaterialization("served_endpoint", metadata={"record": dg.MetadataValue.json(record_to_json(old))})
    )
    deployment = load_deployment(_deployment(tmp_path), home=tmp_path)
    assert endpoint_down(instance, deployment, Registry()) == "it was served by 'kserve-local', which is not installed"


def test_ui_on_a_port_in_use_says_which_and_what_to_do_and_writes_nothing(tmp_path):
    import socket

    _deployment(tmp_path)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = aiplane(tmp_path, "ui", "--port", str(port))
    assert out.returncode == 1, out.stderr
    assert f"Cannot serve the UI on 127.0.0.1:{port}" in out.stderr and "Choose another with --port" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "dagster").exists()
