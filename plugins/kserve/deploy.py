"""The ``deploy-endpoint`` workload: blue/green deploy of a local KServe model server.

An endpoint keeps one address for its life; a deploy swaps the server behind
it (``_port`` explains how and why):

1. Validate: settings, adapter and base-model directories, the host, and the
   port (nothing else may listen on it) before anything starts.
2. Under the endpoint's lock, stop stray servers of the endpoint, bind the
   endpoint's port (the current server's when it is alive) with ``SO_REUSEPORT``
   and a private loopback port, and start the new server detached (own session,
   output to a log in the state directory) so it outlives this workload and the
   Dagster run. Until it is promoted, connections to the endpoint's port keep
   reaching the current server.
3. Wait until the new server is ready on its private port: v2 ``/ready`` answers
   200 and one real completion works. If it exits or times out, kill it and raise
   with the tail of its log; the old server keeps serving on the same URL and
   ``current.json`` is untouched.
4. Only then write ``current.json`` (atomically), steer new connections to the new
   server, and stop the old one, which finishes the requests it has.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiplane.core.artifacts import atomic_write_text
from aiplane.core.errors import ConfigError, InputError, PluginError, WorkloadError
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord
from aiplane.core.storage import local_path
from aiplane.core.workload import WorkloadContext

from . import _port
from ._process import (
    CURRENT,
    SERVER_MODULE,
    check_endpoint_name,
    is_our_server,
    kill_now,
    live_current,
    locked,
    remove_quietly,
    strays,
    terminate,
)
from .client import complete

if TYPE_CHECKING:
    from .target import KServeLocal

__all__ = ["run"]

PROTOCOLS = ("kserve-v2", "openai-completions")
_LOG_TAIL_LINES = 20


class _NotReady(Exception):
    """The new server failed before it became ready; the message says how."""


def run(ctx: WorkloadContext) -> dict[str, EndpointRecord]:
    """Deploy ``ctx.inputs["adapter"]`` as endpoint ``ctx.params["endpoint_name"]``; see the module docstring."""
    from .target import KServeLocal

    settings = KServeLocal(ctx.params.get("settings")).settings
    name = check_endpoint_name(ctx.params.get("endpoint_name"))
    if not ctx.params.get("home"):
        raise ConfigError("deploy-endpoint needs params.home, the directory holding aiplane's state")
    state_dir = Path(ctx.params["home"]).expanduser().absolute() / "serving" / name
    adapter = ctx.inputs.get("adapter")
    if not isinstance(adapter, AdapterRecord):
        raise InputError("deploy-endpoint needs an adapter_weights record as its 'adapter' input")
    base = _base_model(adapter)
    # An adapter in object storage is fetched once per digest into the local cache.
    adapter_dir = _local_dir(str(ctx.local(adapter.uri)), "Adapter", "adapter_config.json")
    base_dir = _local_dir(str(ctx.local(base.uri, base.digest)), "Base model", "config.json")
    if importlib.util.find_spec("kserve") is None:
        raise PluginError("kserve-local needs the kserve package where it runs: pip install 'aiplane[serve]'")
    problems = _port.problems(settings.host, settings.port, live_current(state_dir, name), name)
    if problems:
        raise ConfigError(" ".join(problems))

    with locked(state_dir):
        previous = live_current(state_dir, name)
        for pid in strays(state_dir, name, keep=previous["pid"] if previous else None):
            kill_now(pid)
            ctx.log(f"stopped stray server pid {pid} of endpoint {name!r}, left running by an interrupted deploy")
        public, moved = _port.claim(settings.host, settings.port, previous, name)
        if moved:
            ctx.log(moved)
        try:
            proc, url, log, digest = _swap(
                ctx, public, previous, settings, name, state_dir, adapter, base, base_dir, adapter_dir
            )
        finally:
            public.close()
        # Logs of servers that are gone (the old one, failed attempts) have served their purpose.
        for old_log in state_dir.glob("server-*.log"):
            if old_log != log:
                remove_quietly(old_log)

    return {
        "endpoint": EndpointRecord(
            uri=url,
            url=url,
            digest=digest,
            model_name=name,
            protocols=PROTOCOLS,
            serving="kserve-local",
            handle={"pid": proc.pid, "state_dir": str(state_dir), "log": str(log)},
            sources=(adapter,),
        )
    }


def _swap(
    ctx: WorkloadContext,
    public: socket.socket,
    previous: dict[str, Any] | None,
    settings: "KServeLocal.Settings",
    name: str,
    state_dir: Path,
    adapter: AdapterRecord,
    base: BaseModelRecord,
    base_dir: Path,
    adapter_dir: Path,
) -> tuple[subprocess.Popen, str, Path, str]:
    """Start the new server on ``public``, make it current once ready, stop ``previous``; the lock is held."""
    port = public.getsockname()[1]
    url = f"http://{_port.url_host(settings.host)}:{port}"
    digest = _endpoint_digest(adapter, base, name, url)
    log = state_dir / f"server-{ctx.run_id}.log"
    private = _port.private_socket(public.family)
    private_url = f"http://{_port.url_host(private.getsockname()[0])}:{private.getsockname()[1]}"
    ctx.log(f"starting KServe server for endpoint {name!r} on {url} (checked on {private_url}; log: {log})")
    steering = _port.Steering(public)
    started = time.monotonic()
    proc = _start(public, private, log, base_dir, adapter_dir, name, settings.host, port, settings.max_new_tokens)
    try:
        _wait_ready(ctx, proc, private_url, name, settings.readiness_timeout_s, steering)
        info = {
            "pid": proc.pid,
            "url": url,
            "host": settings.host,
            "port": port,
            "model_name": name,
            "adapter_digest": adapter.digest,
            "base_model_digest": base.digest,
            "digest": digest,
            "log": str(log),
            "run_id": ctx.run_id,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # The switch: from here on the new server is the endpoint.
        atomic_write_text(state_dir / CURRENT, json.dumps(info, indent=2, sort_keys=True) + "\n")
    except BaseException as exc:
        kill_now(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if isinstance(exc, _NotReady):
            raise WorkloadError(
                f"The new server for endpoint {name!r} {exc}; it was stopped and {_still(previous, name)}. "
                f"Last lines of its log {log}:\n{_tail(log)}"
            ) from None
        raise
    startup_s = time.monotonic() - started
    ctx.metrics["startup_s"] = round(startup_s, 3)
    ctx.log(f"endpoint {name!r} is ready on {url} after {startup_s:.1f} s (pid {proc.pid})")

    shares_port = previous is not None and (previous.get("host"), previous.get("port")) == (settings.host, port)
    if shares_port and steering.to(_port.NEWEST):
        time.sleep(_port.DRAIN_S)
    if previous is not None and terminate(previous["pid"], name):
        ctx.log(f"stopped the previous server of {name!r} (pid {previous['pid']}, {previous.get('url')})")
    # Alone on the port now: keep the next deploy's server dark until it is promoted.
    steering.to(_port.OLDEST)
    if steering.failure:
        ctx.log(
            f"cannot steer connections on port {port} ({steering.failure}); during a swap the kernel spreads "
            "them over both servers, and the few queued on the old one when it stops may be reset"
        )
    return proc, url, log, digest


def _still(previous: dict[str, Any] | None, name: str) -> str:
    """What keeps serving after a failed deploy, for the error message."""
    if previous is not None and is_our_server(previous["pid"], name):
        return f"server pid {previous['pid']} keeps serving {previous.get('url')}"
    return "the endpoint is as it was"


def _base_model(adapter: AdapterRecord) -> BaseModelRecord:
    try:
        base = adapter.source("base_model")
    except LookupError:
        raise InputError(
            f"Adapter {adapter.uri!r} records no base_model source, so there is nothing to apply it to; "
            "re-train it so its record carries the base model."
        ) from None
    return base


def _local_dir(uri: str, what: str, marker: str) -> Path:
    path = local_path(uri)
    if not path.is_dir():
        raise InputError(
            f"{what} directory {str(path)!r} does not exist (record uri {uri!r}); kserve-local serves from "
            "this machine's disk: re-materialize it here."
        )
    if not (path / marker).is_file():
        raise InputError(f"{what} directory {str(path)!r} has no {marker}; it is not a usable {what.lower()}.")
    return path.absolute()


def _start(
    public: socket.socket,
    private: socket.socket,
    log: Path,
    base_dir: Path,
    adapter_dir: Path,
    name: str,
    host: str,
    port: int,
    max_new_tokens: int,
) -> subprocess.Popen:
    """Start the server detached, serving on both sockets; this process's copy of ``private`` is closed.

    The deployer keeps ``public`` until the swap is done: it steers the port's
    connections through it once the server listens.
    """
    cmd = [
        sys.executable, "-m", SERVER_MODULE,
        "--base-model", str(base_dir),
        "--adapter", str(adapter_dir),
        "--model-name", name,
        "--host", host,
        "--port", str(port),
        "--socket-fd", str(public.fileno()),
        "--private-socket-fd", str(private.fileno()),
        "--max-new-tokens", str(max_new_tokens),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with open(log, "ab") as out:
            # A new session: no terminal hang-up or process-group signal aimed at the
            # deploying process (or the Dagster run) reaches the server.
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=log.parent,
                env=env,
                pass_fds=(public.fileno(), private.fileno()),
                start_new_session=True,
            )
    finally:
        # Only the server may hold it: if the server dies, its private port must close, not hang.
        private.close()


def _wait_ready(
    ctx: WorkloadContext, proc: subprocess.Popen, url: str, name: str, timeout_s: float, steering: _port.Steering
) -> None:
    """Until the server at ``url`` (its private address) answers; once its public socket listens, keep it dark."""
    deadline = time.monotonic() + timeout_s
    ready_url = f"{url}/v2/models/{name}/ready"
    dark = False
    while True:
        ctx.check_cancelled()
        if not dark and steering.listening():
            steering.to(_port.OLDEST)
            dark = True
        code = proc.poll()
        if code is not None:
            raise _NotReady(f"exited with code {code} before it was ready")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _NotReady(
                f"was not ready within readiness_timeout_s={timeout_s:g} s (raise it if the model needs longer to load)"
            )
        if _answers_200(ready_url, timeout=min(2.0, remaining)):
            try:
                complete(url, "Hello", max_tokens=2, timeout=max(remaining, 1.0), model=name)
            except InputError as exc:
                raise _NotReady(f"reported ready but failed its first completion: {exc}") from None
            return
        time.sleep(0.2)


def _answers_200(url: str, timeout: float) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _endpoint_digest(adapter: AdapterRecord, base: BaseModelRecord, name: str, url: str) -> str:
    """What the endpoint serves and where. A new URL is a new version, so what records the URL
    downstream (the factsheet, lineage) is brought up to date when the endpoint moves."""
    canonical = json.dumps(
        {"adapter": adapter.digest, "base_model": base.digest, "model_name": name, "url": url},
        sort_keys=True,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _tail(log: Path) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    # Progress bars rewrite a line with carriage returns; keep what they finally said.
    lines = [line.rsplit("\r", 1)[-1] for line in text.rstrip("\n").split("\n")]
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(log is empty)"
