"""What every serving target on vLLM shares: the endpoint's record, its version names, the settings that mean
the same flags everywhere, and the first completion a new version must answer.

The ``vllm`` target (a server on this machine), the ``kserve`` target (an
InferenceService) and the ``kserve-llm`` target (an LLMInferenceService) serve
an adapter the same way: the endpoint name routes to the newest version, each
version is also served as ``<endpoint>@<digest>`` for rollback, and the
endpoint's record pins what is served where. Those promises live here, once,
so no serving plugin imports another. Pure functions and pydantic models: no
Kubernetes client, no vLLM. What only the targets on a cluster share is in
:mod:`aiplane.core.serving_cluster` (talking to it) and
:mod:`aiplane.core.serving_rollout` (what a rollout there does).
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InputError, WorkloadError
from .records import AdapterRecord, BaseModelRecord, EndpointRecord

__all__ = [
    "LORA_RANKS",
    "POD_ENV",
    "PROTOCOLS",
    "SERVER_MODULE",
    "ServerSettings",
    "base_model_of",
    "endpoint_digest",
    "endpoint_record",
    "first_completion",
    "is_full_model",
    "server_args",
    "version_name",
]

PROTOCOLS = ("openai-completions", "openai-chat-completions")
"""What an endpoint on vLLM's OpenAI server answers."""
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank`` (KServe's ``maxRank`` becomes that flag too)."""
POD_ENV: dict[str, str] = {
    # Caches in writable scratch space: OpenShift runs the image as an arbitrary UID whose home is not writable.
    "HF_HOME": "/tmp/hf_home",
    "HOME": "/tmp",
}
"""The vLLM server's environment in a cluster's pods (the ``kserve`` and ``kserve-llm`` targets)."""
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
"""Started as ``python -m``: the ``vllm`` command of the CPU build looks up a distribution named ``vllm`` and fails."""


class ServerSettings(BaseModel):
    """The vLLM settings every serving target on vLLM takes: the same names mean the same flags everywhere."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_previous: int = Field(1, ge=0, le=8)
    """Earlier adapters of an endpoint kept served for rollback; older ones are unloaded."""
    max_lora_rank: int = 16
    """The largest adapter rank the server accepts (vLLM allows 1, 8, 16, 32, 64, ...)."""
    max_loras: int = Field(4, ge=1)
    """Adapters served in one batch."""
    max_model_len: int | None = Field(None, ge=16)
    """Context length; default: the model's."""
    dtype: str | None = None
    """vLLM's ``--dtype``; default: what the model's config says."""
    extra_args: tuple[str, ...] = ()
    """More vLLM server flags, as written on its command line (``--enable-prefix-caching``)."""

    @field_validator("max_lora_rank")
    @classmethod
    def _a_vllm_rank(cls, value: int) -> int:
        if value not in LORA_RANKS:
            raise ValueError(f"must be one of {', '.join(map(str, LORA_RANKS))}")
        return value

    def flags(self, lora: bool = True) -> dict[str, Any]:
        """These settings as :func:`server_args`'s keyword arguments; without
        ``lora``, those of a server for one whole model (no adapters, so no LoRA flags)."""
        if not lora:
            return {"lora": False, "max_model_len": self.max_model_len, "dtype": self.dtype, "extra": list(self.extra_args)}
        return {
            "max_lora_rank": self.max_lora_rank,
            "max_loras": self.max_loras,
            # Loaded, not only batched: per endpoint its name, its current version and those kept for rollback.
            "max_cpu_loras": self.max_loras * (2 + self.keep_previous),
            "max_model_len": self.max_model_len,
            "dtype": self.dtype,
            "extra": list(self.extra_args),
        }


def server_args(
    model: str,
    served_name: str,
    *,
    host: str | None = None,
    port: int | None = None,
    max_lora_rank: int = 16,
    max_loras: int = 4,
    max_cpu_loras: int | None = None,
    max_model_len: int | None = None,
    dtype: str | None = None,
    extra: Sequence[str] = (),
    lora: bool = True,
) -> list[str]:
    """The vLLM OpenAI server's arguments: serve ``model`` as ``served_name``, adapters on, by name.

    ``max_loras`` adapters run in one batch; ``max_cpu_loras`` stay loaded
    (vLLM's default: as many as ``max_loras``), which is what the versions
    kept for rollback need. ``lora=False``: a server for one whole model,
    which takes no adapters (the LoRA arguments are left out).
    """
    if max_lora_rank not in LORA_RANKS:
        raise ValueError(f"max_lora_rank must be one of {', '.join(map(str, LORA_RANKS))}, not {max_lora_rank}")
    args = [f"--model={model}", f"--served-model-name={served_name}"]
    if host is not None:
        args.append(f"--host={host}")
    if port is not None:
        args.append(f"--port={port}")
    if lora:
        args += ["--enable-lora", f"--max-lora-rank={max_lora_rank}", f"--max-loras={max_loras}"]
    if lora and max_cpu_loras is not None:
        args.append(f"--max-cpu-loras={max_cpu_loras}")
    if max_model_len is not None:
        args.append(f"--max-model-len={max_model_len}")
    if dtype is not None:
        args.append(f"--dtype={dtype}")
    return args + list(extra)


def version_name(endpoint: str, adapter_digest: str) -> str:
    """The model name one adapter version of ``endpoint`` is served under, beside the endpoint's own name
    (which routes to the current version): ``tickets@1a2b3c4d5e6f``."""
    return f"{endpoint}@{adapter_digest.split(':')[-1][:12]}"


def is_full_model(adapter: AdapterRecord) -> bool:
    """Whether the record is a whole model (``sft``, a full ``distill`` student), not an adapter on its base model."""
    return bool(adapter.config.get("full_model"))


def base_model_of(adapter: AdapterRecord) -> BaseModelRecord:
    """The base model an adapter applies to; for a whole model, the one it was trained from (its lineage)."""
    base = next((s for s in adapter.sources if s.kind == "base_model"), None)
    if isinstance(base, BaseModelRecord):
        return base
    if is_full_model(adapter):
        broken = f"Model {adapter.uri!r} ({adapter.method}, full_model) records no base_model source, so its lineage is broken"
        raise InputError(f"{broken}; re-train it so its record carries the base model it was trained from.")
    raise InputError(
        f"Adapter {adapter.uri!r} records no base_model source, so there is nothing to apply it to; "
        "re-train it so its record carries the base model."
    )


def endpoint_digest(adapter: AdapterRecord, base: BaseModelRecord, name: str, url: str) -> str:
    """What the endpoint serves and where: a new adapter or model, or a new URL, is a new version downstream."""
    served: dict[str, str | bool] = {"adapter": adapter.digest, "base_model": base.digest, "model_name": name, "url": url}
    if is_full_model(adapter):
        served["full_model"] = True  # the adapter is the model served; the base model is its lineage
    canonical = json.dumps(served, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def endpoint_record(
    adapter: AdapterRecord, base: BaseModelRecord, name: str, url: str, *, uri: str, serving: str, handle: dict[str, Any]
) -> EndpointRecord:
    """The record of endpoint ``name`` at ``url`` serving ``adapter`` through vLLM's OpenAI server (here or on a cluster)."""
    return EndpointRecord(
        uri=uri, url=url, digest=endpoint_digest(adapter, base, name, url), model_name=name, protocols=PROTOCOLS,
        serving=serving, handle=handle, sources=(adapter,),
    )  # fmt: skip


def first_completion(url: str, model: str, timeout: float) -> str:
    """The text ``model`` at ``url`` answers to one short greedy completion; WorkloadError, with the server's own
    words, when it answers with an error or not at all (a new version that cannot answer must not be promoted)."""
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=min(timeout, 120)) as response:
            return str(json.loads(response.read())["choices"][0]["text"])
    except urllib.error.HTTPError as exc:
        raise WorkloadError(f"the new version ({model!r}) answered its first completion with HTTP {exc.code}: "
                            f"{exc.read().decode(errors='replace')[:300]}") from None  # fmt: skip
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise WorkloadError(f"the new version ({model!r}) did not answer its first completion at {url}: {exc}") from None
