"""The serving target contract: deploy gives an ``endpoint`` record that names its target, answers the protocols it
lists, keeps its URL on re-deploy and no secret in its handle, is stopped (once) by a target made afresh from the
record alone; and after a deploy that failed or was cancelled, ``cleanup()`` leaves nothing of it running."""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from aiplane.core.components import ServingTarget
from aiplane.core.config import SecretRef
from aiplane.core.errors import AiplaneError
from aiplane.core.processes import follow_process, start_process, workload_dir
from aiplane.core.records import OPENAI_COMPLETIONS, AdapterRecord, EndpointRecord, record_from_json, record_to_json
from aiplane.core.workload import Workload, read_result

from ._common import Broken, check_check, check_settings, run_workload
from .fixtures import sample_adapter

__all__ = ["check_serving_target", "complete", "OPENAI_COMPLETIONS"]

_MARK = "AIPLANE_CONFORMANCE_DEPLOY"


def complete(url: str, model: str, prompt: str = "Hello", timeout: float = 60) -> str:
    """One completion from ``url``'s OpenAI ``/v1/completions`` route, as ``aiplane up`` asks for it."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0}).encode()
    request = urllib.request.Request(url.rstrip("/") + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return str(json.loads(response.read())["choices"][0]["text"])


def check_serving_target(
    cls: type[ServingTarget[Any]],
    settings: Mapping[str, Any] | None,
    tmp_path: Path,
    adapter: AdapterRecord | None = None,
    engine: Any = None,
    redeploy: bool = True,
    deploy: bool = True,
) -> None:
    """Deploy, re-deploy and stop with serving target ``cls``, then cancel a deploy midway and clean up after it;
    raise ConformanceError naming the broken promise.

    ``adapter`` is what to serve (default: :func:`~aiplane.testing.fixtures.sample_adapter`, files with no weights,
    enough for a target that does not load them). The deploy workload runs in a ``python -m aiplane.core.worker``
    process whose process group ends with it, or on ``engine`` if given: a server must leave that group. The
    cancelled deploy always runs in such a process: it is cancelled as soon as it has started a process outside
    that group (a server), and :meth:`~aiplane.core.components.ServingTarget.cleanup` must stop all it started.
    ``deploy=False`` runs only that part (for a target whose full deploy costs too much for the caller's suite).
    """
    check_settings(cls, ServingTarget, "serving target", settings)
    broken = Broken("serving target", cls.name)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    target = cls(dict(settings or {}), home=home)
    check_check(target, broken, tmp_path, "serving", settings, "conformance-endpoint")
    try:
        target.cleanup("conformance-never-deployed")
    except Exception as exc:  # any error is the broken promise, named below
        raise broken(f"cleanup() of an endpoint never deployed must do nothing, not raise {exc!r}") from None
    adapter = adapter or sample_adapter(tmp_path)
    if deploy:
        _deploy_stop(cls, settings, target, broken, adapter, home, engine, redeploy)
    _cancelled_deploy(cls, settings, broken, adapter, home)


def _deploy_stop(cls: type[ServingTarget[Any]], settings: Mapping[str, Any] | None, target: Any, broken: Broken, adapter: AdapterRecord,
                 home: Path, engine: Any, redeploy: bool) -> None:  # fmt: skip
    record = _deploy(target, broken, adapter, engine)
    # `aiplane stop` and `up` re-create the target from the record's `serving` and the deployment's settings.
    again = cls(dict(settings or {}), home=home)
    try:
        broken.require(again.running(record) is not False, "running() says False right after a deploy")
        if redeploy:
            second = _deploy(target, broken, adapter, engine)
            broken.require(second.url == record.url, f"re-deploying must keep the endpoint's URL: {record.url} then {second.url}")
            record = second
        stopped = again.stop(record)
    except BaseException:  # a failed check too: the endpoint it started is stopped; re-raised
        again.stop(record)
        raise
    broken.require(stopped is True, f"stop() of a running endpoint must return True, got {stopped!r}")
    broken.require(_gone(record), f"the endpoint at {record.url} still answers after stop()")
    broken.require(again.running(record) is not True, "running() says True after stop()")
    broken.require(again.stop(record) is False, "stop() after stop() must return False")


def _deploy(target: Any, broken: Broken, adapter: AdapterRecord, engine: Any) -> EndpointRecord:
    work = target.workload(adapter, "conformance-endpoint")
    broken.require(isinstance(work, Workload), f"workload() must return a Workload, not {type(work).__name__}")
    outputs = run_workload(work, engine).outputs
    record = outputs.get("endpoint")
    broken.require(
        isinstance(record, EndpointRecord),
        f"workload() result has no 'endpoint' key holding an EndpointRecord: {sorted(outputs)}",
    )
    assert isinstance(record, EndpointRecord)
    try:
        _check_record(broken, target, record, adapter)
    except BaseException:  # a failed check too: the endpoint it started is stopped; re-raised
        target.stop(record)
        raise
    return record


def _check_record(broken: Broken, target: Any, record: EndpointRecord, adapter: AdapterRecord) -> None:
    name = target.name
    broken.require(
        record.serving == name,
        f"record.serving is {record.serving!r}, not the component's name {name!r} (stop and up re-create the target from it)",
    )
    broken.require(
        record.model_name == "conformance-endpoint",
        f"record.model_name is {record.model_name!r}, not the endpoint name deployed",
    )
    broken.require(record_from_json(json.loads(json.dumps(record_to_json(record)))) == record, "the endpoint record does not survive JSON")
    broken.require(
        any(s.digest == adapter.digest for s in record.sources),
        "record.sources lacks the adapter it serves (lineage breaks there)",
    )
    broken.require(record.url.startswith(("http://", "https://")), f"record.url {record.url!r} is not an http(s) URL")
    shown = json.dumps(record_to_json(record))
    for ref in _secret_refs(target.settings):
        value = os.environ.get(ref.env_var, "")
        broken.require(len(value) < 4 or value not in shown,
                       f"the record holds the value of secret {ref.env_var} (Dagster shows records): keep its name only")  # fmt: skip
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


def _secret_refs(value: Any) -> Iterator[SecretRef]:
    """Every secret reference in a settings model, at any depth."""
    if isinstance(value, SecretRef):
        yield value
    elif isinstance(value, BaseModel):
        for field in type(value).model_fields:
            yield from _secret_refs(getattr(value, field))
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _secret_refs(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _secret_refs(item)


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


def _cancelled_deploy(
    cls: type[ServingTarget[Any]], settings: Mapping[str, Any] | None, broken: Broken, adapter: AdapterRecord, home: Path
) -> None:
    """A deploy cancelled once it started a process outside its group (or failing on its own), then ``cleanup()``."""
    import psutil

    name, mark = "conformance-cancelled", secrets.token_hex(8)
    work = cls(dict(settings or {}), home=home).workload(adapter, name)
    detached: dict[int, float] = {}  # pid -> create time, of the deploy's processes outside its group
    cancel, done = threading.Event(), threading.Event()
    with workload_dir(work.name) as tmp:
        spec, result = Path(tmp, "workload.json"), Path(tmp, "result.json")
        spec.write_text(work.model_dump_json())
        # The mark is inherited by what the deploy starts (unless it clears its environment: the watch catches that).
        proc = start_process([sys.executable, "-m", "aiplane.core.worker", str(spec), str(result)], env={**os.environ, _MARK: mark})

        def watch() -> None:
            while not done.is_set():
                for child in _descendants(psutil, proc.pid):
                    try:
                        if os.getpgid(child.pid) != proc.pid:
                            detached.setdefault(child.pid, child.create_time())
                            cancel.set()
                    except (ProcessLookupError, psutil.Error):
                        continue
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            follow_process(proc, lambda line: None, cancel, what=work.name)
        except AiplaneError:
            pass  # cancelled, or failed: either way a deploy aiplane cleans up after
        finally:
            done.set()
            watcher.join()
        deployed = _endpoint_of(result, work)
        if deployed is not None:
            # It finished before the cancel reached it: what it started is the endpoint's, which stop() ends.
            cls(dict(settings or {}), home=home).stop(deployed)
            return
    fresh = cls(dict(settings or {}), home=home)
    for attempt in ("cleanup()", "a second cleanup()"):
        try:
            fresh.cleanup(name)
        except Exception as exc:  # any error is the broken promise, named here
            raise broken(f"{attempt} after a cancelled deploy raised {exc!r}; it must be idempotent") from None
    detached.update(_marked(psutil, mark))
    left = _survivors(psutil, detached)
    if left:
        _kill(psutil, detached)  # the check failed; what it made run must not outlive it
    broken.require(not left, f"cleanup() after a cancelled deploy left its processes running: {left}")


def _endpoint_of(result: Path, work: Workload) -> EndpointRecord | None:
    try:
        record = read_result(result, work).outputs.get("endpoint") if result.exists() else None
    except AiplaneError:
        return None  # it failed on its own
    return record if isinstance(record, EndpointRecord) else None


def _marked(psutil: Any, mark: str) -> dict[int, float]:
    """The running processes that carry ``mark`` in their environment, by pid with their create time."""
    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(_MARK) == mark:
                found[proc.pid] = proc.create_time()
        except psutil.Error:
            continue
    return found


def _descendants(psutil: Any, pid: int) -> list[Any]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def _kill(psutil: Any, started: Mapping[int, float]) -> None:
    for pid, created in started.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                for each in (*proc.children(recursive=True), proc):
                    each.kill()
        except psutil.Error:
            continue


def _survivors(psutil: Any, started: Mapping[int, float], within_s: float = 5) -> list[str]:
    """Which of ``started`` (pid -> create time), and what they started since, still run after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        left = []
        for pid, created in started.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"pid {pid} ({' '.join(proc.cmdline())[:80]})")
            except psutil.Error:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
