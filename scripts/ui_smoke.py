"""UI smoke test: materialize the five aiplane assets by clicking "Materialize all" in the Dagster UI.

Starts the UI as a user does, ``aiplane ui --port <free port>``, with a throw-away
``DAGSTER_HOME`` and ``AIPLANE_HOME`` and a tiny-trainer copy of
``deployments/local.yaml``, drives it in headless Chromium (selenium + the Debian
``chromedriver``), waits for the run to succeed, checks through GraphQL that every
asset was materialized by that run, then stops ``aiplane ui`` as Ctrl-C does and
checks that it stopped ``dagster dev`` with it, and stops the model server
``served_endpoint`` left running through its serving target.

Run with the project venv (``pip install -e .[ui-check]`` and Debian's chromium + chromium-driver)::

    .venv/bin/python scripts/ui_smoke.py [--timeout 600]

Then it starts ``aiplane ui`` for a tiny copy of ``deployments/hybrid-local.yaml`` on an
instance of its own and materializes one region's partition (``--region``) from
"Materialize all...": every asset of that partition, and nothing of another region.

Exit status 0 only when all five assets materialized from the UI-launched run, the UI
stopped cleanly, and the region's partition materialized from the UI.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _prepare_regions(tmp: Path, env: dict[str, str]) -> dict[str, str]:
    """The env for the second UI: a tiny copy of ``deployments/hybrid-local.yaml`` on an instance of its own, same home.

    Its AP targets run on the example third-party engine, installed into a directory of its own for this run.
    """
    site = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site),
         str(_REPO / "examples" / "aiplane-example-cloud")],
        check=True, env=env, cwd=tmp,
    )  # fmt: skip
    deployment = yaml.safe_load((_REPO / "deployments" / "hybrid-local.yaml").read_text())
    deployment["trainer"]["settings"].update(_TINY_TRAINER)
    deployment_file = tmp / "ui-smoke-regions.yaml"
    deployment_file.write_text(yaml.safe_dump(deployment, sort_keys=False))
    path = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return {**env, "DAGSTER_HOME": str(tmp / "dagster-regions"), "AIPLANE_DEPLOYMENT": str(deployment_file), "PYTHONPATH": path}


def _prepare(tmp: Path) -> dict[str, str]:
    """Write DAGSTER_HOME, AIPLANE_HOME and the tiny deployment; return the env for ``dagster dev``."""
    # `aiplane ui` writes DAGSTER_HOME's dagster.yaml as `aiplane up` does (telemetry off).
    dagster_home, aiplane_home = tmp / "dagster", tmp / "aiplane"
    aiplane_home.mkdir()
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


def _start_ui(env: dict[str, str], port: int, log_path: Path, cwd: Path) -> subprocess.Popen:
    """``aiplane ui``, from a directory that is not the repository: it needs no workspace file."""
    aiplane = Path(sys.executable).parent / "aiplane"
    # Own session, as a terminal gives a command: the smoke signals it alone, as Ctrl-C would.
    return subprocess.Popen(
        [str(aiplane), "ui", "--port", str(port)], env=env, cwd=cwd, start_new_session=True,
        stdout=log_path.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/server_info", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_for_server(base: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Until ``aiplane ui`` prints the URL of a UI that answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"aiplane ui exited early with status {proc.returncode}: {log_path.read_text()[-2000:]}")
        if f"Dagster UI: {base}" in log_path.read_text() and _answers(base):
            return
        time.sleep(1)
    raise RuntimeError(f"aiplane ui did not print and serve {base} within {timeout:.0f}s")


def _stop_ui(proc: subprocess.Popen, base: str, dagster_home: str) -> list[str]:
    """Ctrl-C to ``aiplane ui``; it must stop ``dagster dev`` and everything it started, and exit 0."""
    problems = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            problems.append("aiplane ui did not exit within 90s of Ctrl-C")
    if proc.returncode not in (0, None):
        problems.append(f"aiplane ui exited {proc.returncode} on Ctrl-C, not 0")
    if _answers(base):
        problems.append(f"the UI still answers at {base} after aiplane ui exited")
    _stop_group(proc, "aiplane ui")
    left = _dagster_processes(dagster_home)
    if left:
        problems.append(f"aiplane ui left Dagster processes running: {', '.join(left)}")
        for pid in left:  # so a failed smoke leaks nothing
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.split()[0]), signal.SIGKILL)
    return problems


def _dagster_processes(dagster_home: str) -> list[str]:
    """Dagster's processes (dagster dev, webserver, daemon, code server) started for this smoke's instance."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"DAGSTER_HOME={dagster_home}".encode() in environ and "dagster" in cmdline:
            found.append(f"{proc.name} ({cmdline.strip()[:80]})")
    return found


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


def _partition_materializations(base: str, names: tuple[str, ...], partition: str | None) -> dict[str, str | None]:
    """Each asset's latest materialization's run id (of ``partition``, for a partitioned one)."""
    q = """query($path: [String!]!, $partitions: [String!]) { assetOrError(assetKey: {path: $path}) { ... on Asset {
        assetMaterializations(limit: 1, partitions: $partitions) { runId } } } }"""
    out: dict[str, str | None] = {}
    for name in names:
        variables = {"path": [name], "partitions": [partition] if partition and name != "base_model" else None}
        mats = _graphql(base, q, variables)["assetOrError"].get("assetMaterializations") or []
        out[name] = mats[0]["runId"] if mats else None
    return out


def _launch_region_from_ui(driver, base: str, shots: Path, region: str) -> None:
    """"Materialize all" on the partitioned graph, with the partition selection narrowed to ``region``."""
    # For partitioned assets the button opens a dialog, and says so: "Materialize all...".
    def button() -> list:
        xp = "//button[starts-with(normalize-space(.), 'Materialize all')]"
        return [b for b in driver.find_elements("xpath", xp) if b.is_displayed() and b.is_enabled()]

    driver.get(base + "/asset-groups")
    _wait_for(button, 120, 'the "Materialize all..." button')
    time.sleep(3)
    _dismiss_onboarding(driver)
    button()[0].click()
    _log('clicked "Materialize all..." (partitioned)')
    def launch_dialog():
        # Found anew each time: the dialog re-renders as the selection changes.
        found = [d for d in driver.find_elements("xpath", "//*[@role='dialog']") if "Launch runs to materialize" in d.text]
        return found[-1] if found else None

    _wait_for(launch_dialog, 60, "the launch dialog")
    time.sleep(2)
    driver.save_screenshot(str(shots / "region-dialog.png"))
    _log("launch dialog: " + " | ".join(launch_dialog().text.splitlines())[:600])
    # Partition selection: "Custom", then in the tag selector's list only the region's partition ticked.
    for choice in launch_dialog().find_elements("xpath", ".//button[normalize-space(.)='Custom']"):
        choice.click()
    time.sleep(1)
    xp_tags = ".//*[contains(@class, 'TagSelector')]//*[contains(@class, 'BaseTag')]//div[@style='cursor: pointer;']"
    while launch_dialog().find_elements("xpath", xp_tags):
        launch_dialog().find_elements("xpath", xp_tags)[0].click()  # a key already in the selection
        time.sleep(0.5)
    launch_dialog().find_element("xpath", ".//*[@aria-haspopup='dialog']").click()
    time.sleep(1)

    def listed():
        items = driver.find_elements("xpath", f"//*[@role='dialog']//*[normalize-space(text())='{region}']")
        return [i for i in items if i.is_displayed()]

    _wait_for(listed, 30, f"partition {region} in the list")[-1].click()
    time.sleep(1)
    # Close the list (a click on the dialog's title), then read what the dialog will launch.
    launch_dialog().find_element("xpath", ".//*[starts-with(normalize-space(text()), 'Launch runs to materialize')]").click()
    time.sleep(1)
    dialog = launch_dialog()
    driver.save_screenshot(str(shots / "region-dialog-narrowed.png"))
    _log("narrowed: " + " | ".join(dialog.text.splitlines())[:600])
    launch = [
        b for b in dialog.find_elements("xpath", ".//button")
        if b.is_displayed() and b.is_enabled() and b.text.strip().startswith("Launch")
    ]
    if not launch:
        raise RuntimeError(f"no enabled Launch button in the dialog: {dialog.text[:300]!r}")
    _log(f'clicking "{launch[-1].text.strip()}"')
    launch[-1].click()


def _region_part(driver, env: dict[str, str], tmp: Path, region: str, timeout: float) -> list[str]:
    """The hybrid local deployment's UI: one region's partition materialized from it, every asset of the chain."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp / "aiplane-ui-regions.log"
    _log(f"starting aiplane ui for hybrid-local on {base} (log {log_path})")
    proc = _start_ui(env, port, log_path, tmp)
    problems: list[str] = []
    try:
        _wait_for_server(base, proc, log_path, 180)
        _launch_region_from_ui(driver, base, tmp, region)

        def done() -> dict[str, str | None] | None:
            mats = _partition_materializations(base, ASSETS, region)
            return mats if all(mats.values()) else None

        try:
            mats = _wait_for(done, timeout, f"region {region}'s partition of every asset", interval=3)
            _log(f"region {region}: every asset materialized from the UI ({', '.join(f'{k} run {v[:8]}' for k, v in mats.items())})")
        except RuntimeError as exc:
            problems.append(f"region {region}: {exc}; have {_partition_materializations(base, ASSETS, region)}")
        others = {r: _partition_materializations(base, ASSETS[1:], r) for r in ("eu", "us", "ap") if r != region}
        if any(any(v.values()) for v in others.values()):
            problems.append(f"partitions other than {region} were materialized: {others}")
    except Exception as exc:  # noqa: BLE001 - report, then clean up below
        problems.append(f"region part: {type(exc).__name__}: {exc}")
        driver.save_screenshot(str(tmp / "region-error.png"))
    finally:
        problems += _stop_ui(proc, base, env["DAGSTER_HOME"])
    return problems


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
    """Run the smoke test; 0 when all five assets materialized from the UI-launched run, and the region's partition."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the run (default 600)")
    parser.add_argument("--region", default="ap", help="the hybrid local deployment's region to materialize from the UI (default ap)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="aiplane-ui-smoke-"))
    env = _prepare(tmp)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    dev_log = tmp / "aiplane-ui.log"
    _log(f"temp dir {tmp}; starting aiplane ui on {base} (log {dev_log})")
    proc = _start_ui(env, port, dev_log, tmp)
    driver = None
    regional: dict[str, str] | None = None
    run_id, status, problems, notes = "-", "NOT STARTED", [], []
    ok_assets: list[str] = []
    run_started = run_ended = None
    try:
        _wait_for_server(base, proc, dev_log, 180)
        _log(f"aiplane ui up after {time.monotonic() - started:.1f}s")
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
        problems += _stop_ui(proc, base, env["DAGSTER_HOME"])
        if not problems:
            # Regions in the UI: the hybrid local deployment's partition of one region, from "Materialize all".
            regional = _prepare_regions(tmp, env)
            region_problems = _region_part(driver, regional, tmp, args.region, args.timeout)
            problems += region_problems
            status += f"; region {args.region} " + ("FAILED" if region_problems else "SUCCESS")
    except Exception as exc:  # noqa: BLE001 - report any failure, then clean up below
        problems.append(f"{type(exc).__name__}: {exc}")
        if driver is not None:
            driver.save_screenshot(str(tmp / "error.png"))
            _log(f"screenshot at failure: {tmp / 'error.png'}")
    finally:
        if driver is not None:
            driver.quit()
        if proc.poll() is None:
            problems += _stop_ui(proc, base, env["DAGSTER_HOME"])
        _log("aiplane ui stopped")
        try:
            for s in [*_stop_endpoints(env), *(_stop_endpoints(regional) if regional else [])]:
                _log(f"stopped model server {s}")
        except Exception as exc:  # noqa: BLE001 - cleanup failures must still be reported
            problems.append(f"stopping endpoints failed: {type(exc).__name__}: {exc}")

    for note in notes:
        _log(f"UI note: {note}")
    for shot in ("graph-before.png", "run-after.png", "graph-after.png", "region-dialog.png", "region-dialog-narrowed.png"):
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
