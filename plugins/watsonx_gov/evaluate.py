"""Evaluation with IBM's ``ibm-watsonx-gov``: its metrics on the eval split's generations, as ``eval_*`` metrics.

:class:`WatsonxGovEvaluator` is the ``watsonx_gov`` evaluator (the ``aiplane_evaluators``
hook): a trainer runs it after its own exact-match evaluation when
``trainer.settings.evaluation.watsonx_gov`` is set, without knowing this plugin; the metrics
join the adapter record, so the factsheet, the governance gate and the
``watsonx-governance`` publisher see them like ``eval_accuracy``.

``ibm-watsonx-gov`` pins what aiplane cannot share (``pandas<2.3``, ``wrapt<2``),
so it runs in a runtime environment of its own (:data:`WXGOV_RUNTIME`,
provisioned on first use) as a subprocess running ``_evaluate_main.py`` by path.
The library computes these metrics on this machine, but computes nothing until
it has authenticated to a watsonx.governance instance (IBM Cloud or Cloud Pak for
Data): it checks the entitlement first. So the settings name the instance and the
API key by reference, like the publisher's. Metrics that need a judge model are
off unless ``judge`` is set; the judge is any OpenAI-compatible endpoint.

Importing this module imports nothing heavy: it is imported with the trainer's settings.
"""

from __future__ import annotations

import difflib
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aiplane.core.config import SecretRef
from aiplane.core.errors import WorkloadError
from aiplane.core.evaluation import Evaluator
from aiplane.core.runtimes import RuntimeSpec

from .connection import WatsonxConnection

if TYPE_CHECKING:
    from aiplane.core.workload import WorkloadContext

__all__ = ["EvaluationSettings", "WatsonxGovEvaluator", "LOCAL_METRICS", "JUDGE_METRICS", "WXGOV_RUNTIME", "evaluate_generations"]

_VERSION = "1.5.2"

LOCAL_METRICS: dict[str, str] = {
    "answer_similarity": "token recall of the reference in the generated text (token_recall)",
    "answer_relevance": "token recall of the prompt in the generated text (token_recall)",
}
"""Metrics ibm-watsonx-gov computes on this machine without a model: each becomes ``eval_<name>``.

Its other reference-based methods (``bert_score_recall``, ``sentence_bert_mini_lm``)
download a model from the Hugging Face Hub, the readability metrics download
NLTK's CMU dictionary, and ROUGE/BLEU are computed by the service, not the library.
"""
JUDGE_METRICS: dict[str, str] = {
    "answer_similarity": "the judge model rates how well the generated text matches the reference",
    "answer_relevance": "the judge model rates how relevant the generated text is to the prompt",
}
"""Metrics a judge model computes (``method: llm_as_judge``): each becomes ``eval_<name>_llm_judge``."""

# `metrics` brings unitxt, which computes the token metrics; `llmaj` the judge's clients. One runtime for
# both: the judge's part adds ~3% to its ~1 GB, and a judge turned on later needs no second install.
_CHECK = "import os; os.environ['LITELLM_LOCAL_MODEL_COST_MAP'] = 'True'; import ibm_watsonx_gov.metrics, unitxt, openai"
WXGOV_RUNTIME = RuntimeSpec(
    name="ibm-watsonx-gov", requirements=(f"ibm-watsonx-gov[llmaj,metrics]=={_VERSION}",), check=_CHECK
)
"""ibm-watsonx-gov with what its local metrics and an OpenAI-compatible judge need."""
_SCRIPT = Path(__file__).with_name("_evaluate_main.py")
# IBM Cloud regions by the names the publisher's settings use, as the library spells them.
_REGIONS = {"dallas": "us-south", "frankfurt": "eu-de", "london": "eu-gb", "tokyo": "jp-tok", "toronto": "ca-tor",
            "sydney": "au-syd"}


def _known(kind: str, names: Sequence[str], allowed: Mapping[str, str]) -> list[str]:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        hints = [f"Did you mean {m[0]!r}?" for n in unknown for m in [difflib.get_close_matches(n, allowed, 1)] if m]
        raise ValueError(
            f"unknown {kind} {', '.join(repr(n) for n in unknown)}; ibm-watsonx-gov computes: "
            f"{', '.join(allowed)}. " + " ".join(hints)
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{kind}s are listed twice: {list(names)}")
    return list(names)


class JudgeSettings(BaseModel):
    """A judge model for the metrics that need one: an OpenAI-compatible chat endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    """The model's name at the endpoint (``gpt-4o-mini``, ``ibm-granite/granite-3.3-8b-instruct``)."""
    url: str
    """The endpoint's OpenAI API base, ``https://api.openai.com/v1`` or a vLLM server's ``http://host:8000/v1``."""
    api_key: SecretRef | None = None
    """Its API key by reference (``{env: OPENAI_API_KEY}``); empty for an endpoint without one."""
    metrics: list[str] = Field(default_factory=lambda: ["answer_similarity"])
    """What the judge computes; each becomes ``eval_<name>_llm_judge``."""

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        return _known("judge metric", v, JUDGE_METRICS)

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"url {value!r} needs its scheme, e.g. 'https://{value}'")
        return value.rstrip("/")


class WatsonxGovEvaluation(WatsonxConnection):
    """``evaluation.watsonx_gov``: which ibm-watsonx-gov metrics, and the instance that entitles the library."""

    metrics: list[str]
    """Metrics computed locally (see :data:`LOCAL_METRICS`); each becomes ``eval_<name>``."""
    cpd_version: str = "5.2"
    """The Cloud Pak for Data version (``cpd`` only); the library needs one to know it is not IBM Cloud."""
    judge: JudgeSettings | None = None
    """A judge model for the metrics that need one; none (the default): no judged metrics, nothing leaves
    the machine but the authentication."""

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"metrics must name at least one of {', '.join(LOCAL_METRICS)}")
        return _known("metric", v, LOCAL_METRICS)

    def connection(self) -> dict[str, Any]:
        """What the evaluator script needs to authenticate, without the key."""
        if self.platform == "cpd":
            return {"platform": "cpd", "url": self.url, "username": self.username, "version": self.cpd_version,
                    "disable_ssl_verification": self.disable_ssl_verification}
        return {"platform": "ibm-cloud", "region": _REGIONS[self.region], "service_instance_id": self.service_instance_id}

    def names(self) -> list[str]:
        """The ``eval_*`` metric names this evaluation adds."""
        judged = [f"{n}_llm_judge" for n in self.judge.metrics] if self.judge else []
        return [f"eval_{n}" for n in [*self.metrics, *judged]]


class EvaluationSettings(BaseModel):
    """``trainer.settings.evaluation``: evaluations beside the trainer's own loss and exact-match accuracy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    watsonx_gov: WatsonxGovEvaluation | None = None
    """Metrics from IBM's ibm-watsonx-gov on the eval split's generations; none: not run."""

    def check_secrets(self) -> None:
        """Raise :class:`ConfigError` naming the variable when a key is not set: before hours of training, not after."""
        if self.watsonx_gov is None:
            return
        self.watsonx_gov.api_key.resolve()
        if self.watsonx_gov.judge and self.watsonx_gov.judge.api_key:
            self.watsonx_gov.judge.api_key.resolve()


class WatsonxGovEvaluator(Evaluator):
    """The ``watsonx_gov`` evaluator: ibm-watsonx-gov's metrics on the eval split's generations."""

    name = "watsonx_gov"
    Settings = WatsonxGovEvaluation
    settings: WatsonxGovEvaluation

    def metrics(self) -> list[str]:
        return self.settings.names()

    def check(self) -> None:
        EvaluationSettings(watsonx_gov=self.settings).check_secrets()

    def evaluate(self, rows: Sequence[Mapping[str, Any]], predictions: Sequence[str], ctx: "WorkloadContext") -> dict[str, float]:
        return evaluate_generations(EvaluationSettings(watsonx_gov=self.settings), rows, predictions, ctx)


def evaluate_generations(
    settings: EvaluationSettings,
    rows: Sequence[Mapping[str, Any]],
    predictions: Sequence[str],
    ctx: "WorkloadContext",
    ensure: Callable[..., Path] | None = None,
) -> dict[str, float]:
    """The ``eval_*`` metrics of ``predictions`` (one per eval row, generated for its ``prompt``).

    Each is also reported as a metric event. ``ensure`` returns the runtime's
    Python (default: :func:`aiplane.core.runtimes.ensure_runtime`, which
    provisions it once per machine). Raises :class:`WorkloadError` saying what failed.
    """
    s = settings.watsonx_gov
    if s is None or not rows:
        if s is not None:
            ctx.log("no eval rows: the ibm-watsonx-gov metrics are not measured")
        return {}
    if len(rows) != len(predictions):
        raise WorkloadError(f"{len(predictions)} generations for {len(rows)} eval rows; they must pair up")
    from aiplane.core.processes import stream_process
    from aiplane.core.runtimes import ensure_runtime, runtime_env

    python = (ensure or ensure_runtime)(WXGOV_RUNTIME, ctx.log, ctx.cancel_event)
    env = runtime_env()
    for name in ("WATSONX_APIKEY", "WATSONX_TOKEN", "WATSONX_URL", "WATSONX_USERNAME", "WATSONX_PASSWORD",
                 "WATSONX_VERSION", "WATSONX_REGION", "WXG_URL", "WXG_SERVICE_INSTANCE_ID", "AIPLANE_JUDGE_API_KEY",
                 "OPENAI_API_KEY", "OPENAI_API_URL", "OPENAI_URL"):
        env.pop(name, None)  # the library and unitxt read these too: only what the settings say may reach them
    secrets = [s.api_key.resolve()] + ([s.judge.api_key.resolve()] if s.judge and s.judge.api_key else [])
    env["WATSONX_APIKEY"] = secrets[0]
    if len(secrets) > 1:
        env["AIPLANE_JUDGE_API_KEY"] = secrets[1]
    # Nothing is fetched at run time: litellm (imported by the library) would fetch its price list,
    # and no model comes from the Hub.
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    request = {
        "metrics": list(s.metrics),
        "connection": s.connection(),
        "judge": {"model": s.judge.model, "url": s.judge.url, "metrics": list(s.judge.metrics)} if s.judge else None,
    }
    with tempfile.TemporaryDirectory(prefix="aiplane-wxgov-eval-") as tmp:
        work = Path(tmp)
        (work / "request.json").write_text(json.dumps(request))
        with open(work / "rows.jsonl", "w") as f:
            for i, (row, prediction) in enumerate(zip(rows, predictions, strict=True)):
                record = {"id": row.get("id", i), "prompt": row["prompt"], "reference": row["completion"].strip(),
                          "prediction": prediction}
                f.write(json.dumps(record) + "\n")
        tail: list[str] = []

        def on_line(line: str) -> None:
            tail[:] = (tail + [line.rstrip()])[-20:]

        cmd = [str(python), str(_SCRIPT), str(work / "request.json"), str(work / "rows.jsonl"), str(work / "out.json")]
        # The library writes nothing we keep; its working directory is the scratch one so a stray file dies with it.
        proc = stream_process(cmd, on_line, ctx.cancel_event, env=env, cwd=str(work), what="ibm-watsonx-gov evaluation")
        if proc.returncode != 0:
            reason = next((line for line in reversed(tail) if line.strip()), "no output")
            for secret in secrets:  # a library's message may quote what it sent; the error reaches logs and Dagster
                reason = reason.replace(secret, "***")
            raise WorkloadError(
                f"ibm-watsonx-gov evaluation failed (exit code {proc.returncode}): {reason}. Check "
                f"trainer.settings.evaluation.watsonx_gov (platform {s.platform!r}, api_key {s.api_key!r}), "
                "or remove it to train without these metrics."
            )
        result = json.loads((work / "out.json").read_text())
    metrics = {f"eval_{name}": float(value) for name, value in result["metrics"].items()}
    if sorted(metrics) != sorted(s.names()):
        raise WorkloadError(f"ibm-watsonx-gov returned {sorted(metrics)}, not the metrics asked for: {sorted(s.names())}")
    for name, value in metrics.items():
        ctx.metric(name, value)
    ctx.log(
        f"{result['library']} on {result['records']} eval rows: "
        + ", ".join(f"{name} {value:.3f} ({result['methods'][name.removeprefix('eval_')]})" for name, value in metrics.items())
    )
    return metrics
