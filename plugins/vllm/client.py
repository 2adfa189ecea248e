"""A small client for vLLM's OpenAI completions route: the local ``vllm`` target's server, or KServe's on OpenShift AI."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from aiplane.core.errors import InputError

__all__ = ["complete"]


def _call(url: str, timeout: float, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise InputError(f"{url} answered HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(f"{url} did not answer: {reason}. Is the endpoint's server running?") from None
    except ValueError as exc:
        raise InputError(f"{url} answered with something that is not JSON: {exc}") from None


def complete(
    url: str,
    prompt: str,
    max_tokens: int = 16,
    timeout: float = 30,
    model: str | None = None,
    temperature: float = 0.0,
) -> str:
    """The text an endpoint generates for ``prompt`` via ``POST {url}/v1/completions``.

    ``model`` defaults to the first model the server lists at ``GET /v1/models``.
    Raises :class:`~aiplane.core.errors.InputError` when the server does not
    answer or answers with an error; for an unknown model, it names the ones served.
    """
    base = url.rstrip("/")
    if model is None:
        listed = _call(f"{base}/v1/models", timeout).get("data") or []
        if not listed:
            raise InputError(f"{base}/v1/models lists no model; pass model= explicitly")
        model = listed[0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
    try:
        answer = _call(f"{base}/v1/completions", timeout, body)
    except InputError as exc:
        if " answered HTTP 404" not in str(exc):
            raise
        # vLLM's 404 names only the base model; the adapters are models too.
        names = [m["id"] for m in _call(f"{base}/v1/models", timeout).get("data") or []]
        raise InputError(f"{base} serves no model {model!r}; it serves: {', '.join(names) or 'nothing'}") from None
    try:
        return answer["choices"][0]["text"]
    except (KeyError, IndexError, TypeError):
        raise InputError(f"{base}/v1/completions answered without choices: {str(answer)[:300]}") from None
