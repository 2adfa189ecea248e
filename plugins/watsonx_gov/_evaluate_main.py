"""Compute ibm-watsonx-gov metrics on generations; runs in the ibm-watsonx-gov runtime, not in aiplane's venv.

Usage: ``python _evaluate_main.py REQUEST.json ROWS.jsonl OUT.json``. The runtime
has no aiplane installed, so this file imports only ibm-watsonx-gov, pandas and
the standard library, and :mod:`aiplane.plugins.watsonx_gov.evaluate` runs it by
path. The request names the metrics and the watsonx.governance connection (no
secret); the API keys arrive in the environment: ``WATSONX_APIKEY`` for
watsonx.governance, ``AIPLANE_JUDGE_API_KEY`` for the judge. Each row is
``{"id", "prompt", "reference", "prediction"}``. The result is
``{"metrics": {name: mean}, "methods": {name: method}, "records": n, "library": version}``.
On failure the last line on stderr says why and the exit code is 2.
"""

from __future__ import annotations

import json
import os
import sys


def _fail(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.exit(2)


def _client(connection: dict):
    """An authenticated watsonx.governance client: the library computes nothing without one."""
    from ibm_watsonx_gov.clients.api_client import APIClient
    from ibm_watsonx_gov.entities.credentials import Credentials

    fields = {"api_key": os.environ.get("WATSONX_APIKEY") or None}
    if connection["platform"] == "cpd":
        fields.update(url=connection["url"], username=connection["username"], version=connection["version"],
                      disable_ssl=connection["disable_ssl_verification"])
    else:
        fields.update(region=connection["region"], service_instance_id=connection.get("service_instance_id"))
    return APIClient(credentials=Credentials(**fields))


def _judge(judge: dict | None):
    if not judge:
        return None
    from ibm_watsonx_gov.entities.credentials import OpenAICredentials
    from ibm_watsonx_gov.entities.foundation_model import OpenAIFoundationModel
    from ibm_watsonx_gov.entities.llm_judge import LLMJudge
    from ibm_watsonx_gov.entities.model_provider import OpenAIModelProvider

    api_key = os.environ.get("AIPLANE_JUDGE_API_KEY") or "none"  # the OpenAI client insists on one
    # unitxt, which calls the judge, takes the address from OPENAI_API_URL, not from these credentials.
    os.environ["OPENAI_API_URL"], os.environ["OPENAI_API_KEY"] = judge["url"], api_key
    credentials = OpenAICredentials(url=judge["url"], api_key=api_key)
    model = OpenAIFoundationModel(model_id=judge["model"], provider=OpenAIModelProvider(credentials=credentials))
    return LLMJudge(model=model)


def main(request_path: str, rows_path: str, out_path: str) -> None:
    with open(request_path) as f:
        request = json.load(f)
    with open(rows_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        _fail("no rows to evaluate")

    import pandas as pd
    from importlib.metadata import version

    from ibm_watsonx_gov.config import GenAIConfiguration
    from ibm_watsonx_gov.evaluators import MetricsEvaluator
    from ibm_watsonx_gov import metrics as library_metrics

    classes = {
        "answer_similarity": library_metrics.AnswerSimilarityMetric,
        "answer_relevance": library_metrics.AnswerRelevanceMetric,
    }
    wanted = []  # (name it is reported as, metric object)
    for name in request["metrics"]:
        wanted.append((name, classes[name]()))
    llm_judge = _judge(request.get("judge"))
    for name in (request.get("judge") or {}).get("metrics", []):
        wanted.append((f"{name}_llm_judge", classes[name](llm_judge=llm_judge)))

    data = pd.DataFrame(
        {
            "record_id": [str(r["id"]) for r in rows],
            "input_text": [r["prompt"] for r in rows],
            "generated_text": [r["prediction"] for r in rows],
            "ground_truth": [r["reference"] for r in rows],
        }
    )
    configuration = GenAIConfiguration(
        input_fields=["input_text"], output_fields=["generated_text"], reference_fields=["ground_truth"],
        record_id_field="record_id",
    )
    try:
        client = _client(request["connection"])
    except Exception as exc:  # the library raises plain Exception, ValueError, HTTPError, ApiException
        _fail(f"watsonx.governance did not accept the credentials: {type(exc).__name__}: {exc}")

    results = {}
    methods = {}
    for name, metric in wanted:
        # One call per metric: the same metric class twice (local and judged) would share one result name.
        evaluator = MetricsEvaluator(configuration=configuration, api_client=client)
        try:
            outcome = evaluator.evaluate(data=data, metrics=[metric])
        except Exception as exc:  # the library raises plain Exception and its own types; the message goes back as a failure
            _fail(f"ibm-watsonx-gov could not compute {name}: {type(exc).__name__}: {exc}")
        found = [m for m in outcome.metrics_result if m.value is not None]
        if not found:
            _fail(f"ibm-watsonx-gov returned no value for {name}")
        results[name] = float(found[0].value)
        methods[name] = found[0].method
    with open(out_path, "w") as f:
        json.dump({"metrics": results, "methods": methods, "records": len(rows),
                   "library": f"ibm-watsonx-gov {version('ibm-watsonx-gov')}"}, f)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        _fail("usage: _evaluate_main.py REQUEST.json ROWS.jsonl OUT.json")
    main(*sys.argv[1:])
