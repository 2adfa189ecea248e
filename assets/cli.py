"""``aiplane``: run the whole chain, list plugins, stop the endpoint.

``aiplane up`` materializes every asset through Dagster on the instance in
``$DAGSTER_HOME`` (default ``<home>/dagster``, the same one ``dagster dev`` uses
when started with that ``DAGSTER_HOME``), then prints the endpoint, a sample
completion, the factsheet and the lineage chain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
import warnings
from pathlib import Path

from aiplane.core.config import load_deployment
from aiplane.core.errors import AiplaneError
from aiplane.core.plugins import Registry
from aiplane.core.records import EndpointRecord, FactsheetRecord, record_from_json

__all__ = ["main"]

SAMPLE_PROMPT = "Ticket: VPN keeps disconnecting. Hello, the VPN client times out; blocking my work today.\nLabel:"


def _instance(home: Path):
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(home / "dagster")
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    dagster_home.mkdir(parents=True, exist_ok=True)
    # An empty dagster.yaml: the default instance (SQLite under DAGSTER_HOME), without Dagster warning about it.
    (dagster_home / "dagster.yaml").touch()
    return DagsterInstance.get()


def complete(url: str, model: str, prompt: str, max_tokens: int = 8, timeout: float = 60) -> str:
    """One completion from an OpenAI-style ``/v1/completions`` route (KServe here, vLLM on OpenShift AI)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


def _up(args: argparse.Namespace) -> int:
    from dagster import AssetKey

    from .definitions import build_definitions
    from .resource import AiplaneResource

    deployment = load_deployment(args.deployment or None)
    instance = _instance(deployment.home)
    defs = build_definitions(AiplaneResource(deployment=args.deployment, home=str(deployment.home)))
    job = defs.resolve_implicit_global_asset_job_def()
    # INFO, not Dagster's DEBUG default: the run log then reads as progress (loss, tokens/s), not event plumbing.
    run_config: dict = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    if args.train_target:
        run_config["ops"] = {"adapter_weights": {"config": {"target": args.train_target}}}
    result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=run_config)
    if not result.success:
        failures = [e for e in result.all_events if e.is_failure]
        for event in failures:
            err = event.step_failure_data.error if event.step_failure_data else None
            print(f"FAILED {event.step_key}: {err.message.strip() if err else event.message}", file=sys.stderr)
        return 1
    endpoint: EndpointRecord = result.asset_value(AssetKey("served_endpoint"))
    sheet: FactsheetRecord = result.asset_value(AssetKey("factsheet"))
    print(f"Dagster run:  {result.run_id} (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    print(f"Endpoint:     {endpoint.url}  (model {endpoint.model_name}; stop it with `aiplane stop`)")
    if "openai-completions" in endpoint.protocols:
        try:
            print(f"Completion:   {SAMPLE_PROMPT!r} ->{complete(endpoint.url, endpoint.model_name, SAMPLE_PROMPT)!r}")
        except OSError as exc:  # the chain succeeded; say what the endpoint did rather than dump a traceback
            print(f"Completion:   the endpoint did not answer: {exc}", file=sys.stderr)
    print(f"Factsheet:    {sheet.uri}")
    print(f"              {sheet.page_uri}")
    print("Lineage:")
    for step in json.loads(Path(sheet.uri).read_text())["lineage"]:
        print(f"  {step['kind']:16} {step['digest']:80} {step['uri']}")
    print(f"  {'factsheet':16} {sheet.digest:80} {sheet.uri}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    registry = Registry()
    for p in registry.plugins():
        print(f"{p.name:14} {p.distribution or '-'}-{p.version or '-'}  {', '.join(p.hooks)}")
    for b in registry.broken:
        print(f"{b.name:14} {b.distribution or '-'}-{b.version or '-'}  BROKEN: {b.error}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from dagster import AssetKey

    deployment = load_deployment(args.deployment or None)
    instance = _instance(deployment.home)
    event = instance.get_latest_materialization_event(AssetKey("served_endpoint"))
    if event is None or event.asset_materialization is None:
        print("No endpoint has been materialized on this instance.")
        return 0
    record = record_from_json(event.asset_materialization.metadata["record"].value)
    settings = deployment.serving.settings if deployment.serving.name == record.serving else None
    Registry().create("serving target", record.serving, settings).stop(record)
    print(f"Stopped {record.model_name} at {record.url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiplane", description=__doc__.splitlines()[0])
    parser.add_argument("--deployment", default=os.environ.get("AIPLANE_DEPLOYMENT", ""), help="deployment name or path (default: local)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="materialize the whole chain and show the result")
    up.add_argument("--train-target", default="", help="pin training to this deployment target (placement still checks it)")
    up.set_defaults(fn=_up)
    sub.add_parser("plugins", help="list installed plugins").set_defaults(fn=_plugins)
    sub.add_parser("stop", help="stop the served endpoint").set_defaults(fn=_stop)
    args = parser.parse_args(argv)
    # Output(data_version=...) is how the assets version their data; Dagster's beta label is noise here.
    warnings.filterwarnings("ignore", message=".*data_version.*beta", category=Warning)
    try:
        return args.fn(args)
    except AiplaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
