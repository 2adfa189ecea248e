"""UI smoke test: materialize the five aiplane assets by clicking "Materialize all" in the Dagster UI.

Starts ``dagster dev`` on a free port with a throw-away ``DAGSTER_HOME`` and
``AIPLANE_HOME`` and a tiny-trainer copy of ``deployments/local.yaml``, drives
the UI in headless Chromium (selenium + the Debian ``chromedriver``), waits for
the run to succeed, checks through GraphQL that every asset was materialized by
that run, then stops everything it started: ``dagster dev`` by process group and
the model server ``served_endpoint`` left running through its serving target.

Run with the project venv (``pip install -e .[ui-check]`` and Debian's chromium + chromium-driver)::

    .venv/bin/python scripts/ui_smoke.py [--timeout 600]

Exit status 0 only when all five assets materialized from the UI-launched run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ASSETS", "main"]

ASSETS = ("base_model", "features", "adapter_weights", "served_endpoint", "factsheet")
_REPO = Path(__file__).resolve().parents[1]
_CHROMIUM = "/usr/bin/chromium"
_CHROMEDRIVER = "/usr/bin/chromedriver"
_CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
)
# Small enough that the whole chain takes well under a minute on a 2-core machine.
_TINY_TRAINER = {"max_steps": 12, "batch_size": 4, "seq_len": 64, "eval_limit": 8, "log_every": 4}
_TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
_STOP_GRACE_S = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(msg: str) -> None:
    print(f"[ui_smoke {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _prepare(tmp: Path) -> dict[str, str]:
    """Write DAGSTER_HOME, AIPLANE_HOME and the tiny deployment; return the env for ``dagster dev``."""
    dagster_home, aiplane_home = tmp / "dagster", tmp / "aiplane"
    dagster_home.mkdir()
    aiplane_home.mkdir()
    # Telemetry off: the machine may have no network and we want nothing leaving it.
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    deployment = yaml.safe_load((_REPO / "deployments" / "local.yaml").read_text())
    deployment["trainer"]["settings"].update(_TINY_TRAINER)
    deployment_file = tmp / "ui-smoke.yaml"
    deployment_file.write_text(yaml.safe_dump(deployment, sort_keys=False))
    venv_bin = str(Path(sys.executable).parent)
    # A throw-away home too, as on a fresh machine: matplotlib's font cache, Chromium's crash
    # reports and dconf land there, not in the caller's HOME (CI fails a run that writes to it).
    home = tmp / "home"
    home.mkdir()
    from aiplane.core.runtimes import runtimes_dir

    return {
        **os.environ,
        # The caller's runtime cache (vLLM's environment), not one in the throw-away home: provisioned once.
        "AIPLANE_RUNTIMES": str(runtimes_dir()),
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "MPLCONFIGDIR": str(home / ".config" / "matplotlib"),
        "DAGSTER_HOME": str(dagster_home),
        "AIPLANE_HOME": str(aiplane_home),
        "AIPLANE_DEPLOYMENT": str(deployment_file),
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
    }


def _start_dagster(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    dagster = Path(sys.executable).parent / "dagster"
    cmd = [str(dagster), "dev", "-w", str(_REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)]
    # Own session: the whole tree (webserver, daemon, code server, run workers) shares
    # one process group we can signal, and nothing of ours leaks to the caller's group.
    return subprocess.Popen(
        cmd, env=env, cwd=_REPO, start_new_session=True, stdout=log_path.open("w"), stderr=subprocess.STDOUT
    )


def _wait_for_server(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster dev exited early with status {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/server_info", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise RuntimeError(f"dagster dev did not answer {base}/server_info within {timeout:.0f}s")


def _graphql(base: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(base + "/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        payload = json.loads(resp.read())
    if payload.get("errors"):
        raise RuntimeError(f"GraphQL error: {payload['errors']}")
    return payload["data"]


def _runs(base: str) -> list[dict[str, Any]]:
    q = "{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }"
    return _graphql(base, q)["runsOrError"]["results"]


def _latest_materializations(base: str) -> dict[str, dict[str, Any] | None]:
    q = """query($path: [String!]!) { assetOrError(assetKey: {path: $path}) { ... on Asset {
        assetMaterializations(limit: 1) { runId timestamp metadataEntries { label } } } } }"""
    out: dict[str, dict[str, Any] | None] = {}
    for name in ASSETS:
        mats = _graphql(base, q, {"path": [name]})["assetOrError"].get("assetMaterializations") or []
        out[name] = mats[0] if mats else None
    return out


def _check_results(base: str, run_id: str) -> list[str]:
    q = """query($runId: ID!) { runOrError(runId: $runId) { ... on Run {
        stepStats { stepKey status } } } }"""
    data = _graphql(base, q, {"runId": run_id})["runOrError"]
    return [f"{s['stepKey']}={s['status']}" for s in data.get("stepStats") or []]


def _browser(env: dict[str, str]):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = _CHROMIUM
    for flag in _CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument("--user-data-dir=" + str(Path(env["HOME"]) / "chromium-profile"))
    # An explicit Service keeps selenium-manager from trying to download a driver.
    return webdriver.Chrome(service=Service(_CHROMEDRIVER, env=env), options=opts)


def _buttons(driver, text: str) -> list:
    xp = f"//button[normalize-space(.)='{text}']"
    return [b for b in driver.find_elements("xpath", xp) if b.is_displayed() and b.is_enabled()]


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def _dismiss_onboarding(driver) -> None:
    """The first visit shows a "Join the Dagster community" modal over the graph; skip it."""
    for button in _buttons(driver, "Skip"):
        button.click()
        time.sleep(0.5)


def _launch_from_ui(driver, base: str, shots: Path, before: set[str]) -> str:
    driver.get(base + "/asset-groups")
    _wait_for(lambda: _buttons(driver, "Materialize all"), 60, 'the "Materialize all" button')
    # Let the graph lay out and the onboarding modal appear before dismissing it.
    time.sleep(3)
    _dismiss_onboarding(driver)
    _wait_for(lambda: "Never materialized" in driver.find_element("tag name", "body").text, 30, "asset graph nodes")
    driver.save_screenshot(str(shots / "graph-before.png"))
    _buttons(driver, "Materialize all")[0].click()
    _log('clicked "Materialize all"')

    def new_run() -> str | None:
        # Confirmation dialogs differ across versions (launchpad for config, "stale" warnings);
        # click through the ones that only ask for confirmation.
        for label in ("Launch run", "Materialize", "Confirm", "Launch"):
            for button in _buttons(driver, label):
                if button.find_elements("xpath", "ancestor::*[@role='dialog']"):
                    _log(f'confirmation dialog: clicking "{label}"')
                    button.click()
        fresh = [r["runId"] for r in _runs(base) if r["runId"] not in before]
        return fresh[-1] if fresh else None

    return _wait_for(new_run, 60, "the UI to launch a run", interval=1)


def _watch_run(driver, base: str, run_id: str, timeout: float) -> str:
    driver.get(f"{base}/runs/{run_id}")

    def finished() -> str | None:
        status = next((r["status"] for r in _runs(base) if r["runId"] == run_id), None)
        return status if status in _TERMINAL else None

    status = _wait_for(finished, timeout, f"run {run_id} to finish", interval=2)
    ui_status = {"SUCCESS": "Success", "FAILURE": "Failure", "CANCELED": "Canceled"}[status]
    # The run page updates over its websocket subscription; give it a moment to show the end state.
    try:
        _wait_for(lambda: _run_header_shows(driver, ui_status), 30, f'the run page to show "{ui_status}"')
    except RuntimeError:
        driver.refresh()
        _wait_for(lambda: _run_header_shows(driver, ui_status), 30, f'the run page to show "{ui_status}"')
    return status


def _run_header_shows(driver, text: str) -> bool:
    xp = f"//*[normalize-space(text())='{text}']"
    return any(e.is_displayed() for e in driver.find_elements("xpath", xp))


def _ui_observations(driver, base: str, shots: Path) -> list[str]:
    """Re-open the graph and note anything that looks wrong there (failed checks, stale or missing assets)."""
    driver.get(base + "/asset-groups")
    _wait_for(lambda: _buttons(driver, "Materialize all"), 60, "the asset graph")
    time.sleep(3)
    _dismiss_onboarding(driver)
    driver.save_screenshot(str(shots / "graph-after.png"))
    text = driver.find_element("tag name", "body").text
    notes = []
    for marker in ("Never materialized", "Failed", "Unsynced", "Upstream code version", "error", "Error"):
        if marker in text:
            notes.append(f"asset graph shows {marker!r} {text.count(marker)}x")
    return notes


def _stop_group(proc: subprocess.Popen, what: str) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        _log(f"{what} ignored SIGTERM for {_STOP_GRACE_S:.0f}s; sending SIGKILL")
    # The group leader may be gone while children linger; SIGKILL the whole group regardless.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _stop_endpoints(env: dict[str, str]) -> list[str]:
    """Stop every model server a ``served_endpoint`` materialization on this instance recorded."""
    from dagster import AssetKey, DagsterInstance

    from aiplane.core.config import load_deployment
    from aiplane.core.plugins import Registry
    from aiplane.core.records import record_from_json

    deployment = load_deployment(env["AIPLANE_DEPLOYMENT"], home=env["AIPLANE_HOME"])
    stopped = []
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        # All of them, not only the latest: the automation sensor may have redeployed after our run.
        records = instance.fetch_materializations(AssetKey("served_endpoint"), limit=1000).records
        for rec in records:
            mat = rec.asset_materialization
            if mat is None or "record" not in mat.metadata:
                continue
            endpoint = record_from_json(mat.metadata["record"].value)
            settings = deployment.serving.settings if deployment.serving.name == endpoint.serving else None
            Registry().create("serving target", endpoint.serving, settings).stop(endpoint)
            stopped.append(f"{endpoint.model_name} pid {endpoint.handle.get('pid')}")
    leftovers = sorted(str(p) for p in (Path(env["AIPLANE_HOME"]) / "serving").glob("_vllm/*/server.json"))
    if leftovers:
        _log(f"WARNING: endpoint state still names a server: {', '.join(leftovers)}")
    return stopped


def main(argv: list[str] | None = None) -> int:
    """Run the smoke test; 0 when all five assets materialized from the UI-launched run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the run (default 600)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="aiplane-ui-smoke-"))
    env = _prepare(tmp)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    dev_log = tmp / "dagster-dev.log"
    _log(f"temp dir {tmp}; starting dagster dev on {base} (log {dev_log})")
    proc = _start_dagster(env, port, dev_log)
    driver = None
    run_id, status, problems, notes = "-", "NOT STARTED", [], []
    ok_assets: list[str] = []
    run_started = run_ended = None
    try:
        _wait_for_server(base, proc, 180)
        _log(f"dagster dev up after {time.monotonic() - started:.1f}s")
        driver = _browser(env)
        before = {r["runId"] for r in _runs(base)}
        run_id = _launch_from_ui(driver, base, tmp, before)
        run_started = time.monotonic()
        _log(f"run {run_id} launched from the UI; watching {base}/runs/{run_id}")
        status = _watch_run(driver, base, run_id, args.timeout)
        run_ended = time.monotonic()
        time.sleep(2)
        driver.save_screenshot(str(tmp / "run-after.png"))
        _log(f"run {run_id}: {status} after {run_ended - run_started:.1f}s; steps: {', '.join(_check_results(base, run_id))}")
        mats = _latest_materializations(base)
        for name in ASSETS:
            mat = mats[name]
            if mat is None:
                problems.append(f"{name}: never materialized")
            elif mat["runId"] != run_id:
                problems.append(f"{name}: latest materialization is from run {mat['runId']}, not {run_id}")
            elif "record" not in {m["label"] for m in mat["metadataEntries"]}:
                problems.append(f"{name}: materialization has no 'record' metadata")
            else:
                ok_assets.append(name)
                labels = ", ".join(m["label"] for m in mat["metadataEntries"])
                _log(f"{name} metadata: {labels}")
        if status != "SUCCESS":
            problems.append(f"run ended {status}")
        notes = _ui_observations(driver, base, tmp)
    except Exception as exc:  # noqa: BLE001 - report any failure, then clean up below
        problems.append(f"{type(exc).__name__}: {exc}")
        if driver is not None:
            driver.save_screenshot(str(tmp / "error.png"))
            _log(f"screenshot at failure: {tmp / 'error.png'}")
    finally:
        if driver is not None:
            driver.quit()
        _stop_group(proc, "dagster dev")
        _log("dagster dev stopped")
        try:
            for s in _stop_endpoints(env):
                _log(f"stopped model server {s}")
        except Exception as exc:  # noqa: BLE001 - cleanup failures must still be reported
            problems.append(f"stopping endpoints failed: {type(exc).__name__}: {exc}")

    for note in notes:
        _log(f"UI note: {note}")
    for shot in ("graph-before.png", "run-after.png", "graph-after.png"):
        if (tmp / shot).exists():
            _log(f"screenshot {tmp / shot}")
    for problem in problems:
        _log(f"PROBLEM: {problem}")
    run_s = f"{run_ended - run_started:.1f}s" if run_started and run_ended else "-"
    verdict = "PASS" if not problems else "FAIL"
    print(
        f"ui_smoke {verdict}: run {run_id} {status}, "
        f"{len(ok_assets)}/{len(ASSETS)} assets from the UI run, "
        f"run {run_s}, total {time.monotonic() - started:.1f}s, artifacts in {tmp}"
    )
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
