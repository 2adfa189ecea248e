"""The serving target contract: deploy gives an ``endpoint`` record that names its target, answers the protocols it
lists, keeps its URL on re-deploy, and is stopped (once) by a target made afresh from the record alone."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiplane.core.components import ServingTarget
from aiplane.core.records import AdapterRecord, EndpointRecord, record_from_json, record_to_json
from aiplane.core.workload import Workload

from ._common import Broken, Writes, check_settings, run_workload
from .fixtures import sample_adapter, sample_deployment

__all__ = ["check_serving_target", "complete", "OPENAI_COMPLETIONS"]

OPENAI_COMPLETIONS = "openai-completions"
"""The protocol name ``aiplane up`` looks for before it asks the endpoint for a sample completion."""


def complete(url: str, model: str, prompt: str = "Hello", timeout: float = 60) -> str:
    """One completion from ``url``'s OpenAI ``/v1/completions`` route, as ``aiplane up`` asks for it."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0}).encode()
    request = urllib.request.Request(url.rstrip("/") + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["choices"][0]["text"]


def check_serving_target(
    cls: type,
    settings: Mapping[str, Any] | None,
    tmp_path: Path,
    adapter: AdapterRecord | None = None,
    engine: Any = None,
    redeploy: bool = True,
) -> None:
    """Deploy, re-deploy and stop with serving target ``cls``; raise ConformanceError naming the broken promise.

    ``adapter`` is what to serve (default: :func:`~aiplane.testing.fixtures.sample_adapter`, files with no weights,
    enough for a target that does not load them). The deploy workload runs in a ``python -m aiplane.core.worker``
    process whose process group ends with it, or on ``engine`` if given: a server must leave that group.
    """
    target = check_settings(cls, ServingTarget, "serving target", settings)
    broken = Broken("serving target", cls.name)
    writes = Writes([tmp_path])
    problems = target.check(sample_deployment(tmp_path, "serving", cls.name, dict(settings or {})))
    broken.require(isinstance(problems, list) and all(isinstance(p, str) for p in problems), "check() must return a list of sentences")
    broken.require(not writes.changed(), f"check() must not write anything; it wrote {writes.changed()[:3]}")
    adapter = adapter or sample_adapter(tmp_path)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    record = _deploy(target, broken, adapter, home, engine)
    try:
        # `aiplane stop` and `up` re-create the target from the record's `serving` and the deployment's settings.
        again = cls(dict(settings or {}))
        broken.require(again.running(record) is not False, "running() says False right after a deploy")
        if redeploy:
            second = _deploy(target, broken, adapter, home, engine)
            broken.require(second.url == record.url, f"re-deploying must keep the endpoint's URL: {record.url} then {second.url}")
            record = second
        stopped = again.stop(record)
    except BaseException:
        cls(dict(settings or {})).stop(record)
        raise
    broken.require(stopped is True, f"stop() of a running endpoint must return True, got {stopped!r}")
    broken.require(_gone(record), f"the endpoint at {record.url} still answers after stop()")
    broken.require(again.running(record) is not True, "running() says True after stop()")
    broken.require(again.stop(record) is False, "stop() after stop() must return False")


def _deploy(target: Any, broken: Broken, adapter: AdapterRecord, home: Path, engine: Any) -> EndpointRecord:
    work = target.workload(adapter, "conformance-endpoint", str(home))
    broken.require(isinstance(work, Workload), f"workload() must return a Workload, not {type(work).__name__}")
    outputs = run_workload(work, engine).outputs
    record = outputs.get("endpoint")
    broken.require(isinstance(record, EndpointRecord), f"workload() result has no 'endpoint' key holding an EndpointRecord: {sorted(outputs)}")
    assert isinstance(record, EndpointRecord)
    try:
        _check_record(broken, target.name, record, adapter)
    except BaseException:
        target.stop(record)
        raise
    return record


def _check_record(broken: Broken, name: str, record: EndpointRecord, adapter: AdapterRecord) -> None:
    broken.require(record.serving == name, f"record.serving is {record.serving!r}, not the component's name {name!r} (stop and up re-create the target from it)")
    broken.require(record_from_json(json.loads(json.dumps(record_to_json(record)))) == record, "the endpoint record does not survive JSON")
    broken.require(any(s.digest == adapter.digest for s in record.sources), "record.sources lacks the adapter it serves (lineage breaks there)")
    broken.require(record.url.startswith(("http://", "https://")), f"record.url {record.url!r} is not an http(s) URL")
    try:
        text = complete(record.url, record.model_name)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        broken.require(OPENAI_COMPLETIONS not in record.protocols,
                       f"protocols has {OPENAI_COMPLETIONS!r} but {record.url}/v1/completions did not answer "
                       f"model {record.model_name!r}: {exc}")  # fmt: skip
        return
    broken.require(OPENAI_COMPLETIONS in record.protocols,
                   f"protocols lacks {OPENAI_COMPLETIONS!r} although the endpoint answers it; `aiplane up` asks "
                   "for a sample completion only where it is listed")  # fmt: skip
    broken.require(isinstance(text, str), "the completion's choices[0].text is not a string")


def _gone(record: EndpointRecord, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            complete(record.url, record.model_name, timeout=2)
        except urllib.error.HTTPError:
            pass  # something still answers there, if only with an error
        except (OSError, ValueError):
            return True
        time.sleep(0.2)
    return False
