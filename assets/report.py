"""What ``aiplane up`` prints of a chain it ran: each asset's status, the endpoint, a sample completion, the
factsheet and the lineage chain."""

import json
import os
import sys
import urllib.request

from aiplane.core.records import OPENAI_COMPLETIONS, EndpointRecord, FactsheetRecord

__all__ = ["SAMPLE_PROMPT", "complete", "report_chain", "report_shared"]

SAMPLE_PROMPT = "Ticket: VPN keeps disconnecting. Hello, the VPN client times out; blocking my work today.\nLabel:"


def complete(url: str, model: str, prompt: str, max_tokens: int = 8, timeout: float = 60) -> str:
    """One completion from an OpenAI-style ``/v1/completions`` route (KServe here, vLLM on OpenShift AI)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


def report_shared(asset: str, unchanged: bool, run_id: str) -> None:
    """The status of an asset that is one for every region (the base model), resolved before the regions' runs."""
    print(f"{asset:16} {'up to date (data version unchanged)' if unchanged else 'new data version'} (run {run_id}, one for every region)")


def report_chain(instance, deployment, status: dict[str, str], run_ids: list[str], region: str | None) -> None:
    """What ``aiplane up`` made of one chain: each asset's status, the endpoint, a sample completion, the factsheet, the lineage."""
    from aiplane.core.storage import Storage

    from .state import latest_record

    endpoint = latest_record(instance, "served_endpoint", region)
    sheet = latest_record(instance, "factsheet", region)
    assert isinstance(endpoint, EndpointRecord) and isinstance(sheet, FactsheetRecord)
    if region is not None:
        print(f"Region {region}")
    for key, what in status.items():
        print(f"{key:16} {what}")
    print(f"Dagster run:  {', '.join(run_ids)} (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    print(f"Endpoint:     {endpoint.url}  (model {endpoint.model_name}; stop it with `aiplane stop`)")
    if OPENAI_COMPLETIONS in endpoint.protocols:
        try:
            print(f"Completion:   {SAMPLE_PROMPT!r} ->{complete(endpoint.url, endpoint.model_name, SAMPLE_PROMPT)!r}")
        except OSError as exc:  # the chain succeeded; say what the endpoint did rather than dump a traceback
            print(f"Completion:   the endpoint did not answer: {exc}", file=sys.stderr)
    print(f"Factsheet:    {sheet.uri}")
    print(f"              {sheet.page_uri}")
    print("Lineage:")
    # The factsheet may be in object storage; its JSON says the chain.
    storage = Storage(deployment.storage.s3, deployment.storage.routes())
    for step in json.loads(storage.read_bytes(sheet.uri))["lineage"]:
        print(f"  {step['kind']:16} {step['digest']:80} {step['uri']}")
    print(f"  {'factsheet':16} {sheet.digest:80} {sheet.uri}")


