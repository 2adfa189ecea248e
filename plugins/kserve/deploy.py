"""The ``deploy-endpoint`` workload: blue/green deploy of a local KServe model server.

1. Validate: settings, adapter and base-model directories, and the port (the
   socket is bound here, so a fixed port in use fails before anything starts).
2. Start the new server detached (own session, output to a log in the state
   directory) so it outlives this workload and the Dagster run.
3. Wait until it is ready: v2 ``/ready`` answers 200 and one real completion works.
   If it exits or times out, kill it and raise with the tail of its log; the old
   server keeps serving and ``current.json`` is untouched.
4. Only then write ``current.json`` (atomically) and stop the old server.
"""

from __future__ import annotations

import contextlib
import errno
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
from typing import Any

from aiplane.core.artifacts import atomic_write_text
from aiplane.core.errors import ConfigError, InputError, PluginError, WorkloadError
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord
from aiplane.core.workload import WorkloadContext

from ._process import (
    CURRENT,
    SERVER_MODULE,
    check_endpoint_name,
    is_our_server,
    kill_now,
    locked,
    read_current,
    remove_quietly,
    terminate,
)
from .client import complete

__all__ = ["run"]

PROTOCOLS = ("kserve-v2", "openai-completions")
_LOG_TAIL_LINES = 20
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


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
    adapter_dir = _local_dir(adapter.uri, "Adapter", "adapter_config.json")
    base_dir = _local_dir(base.uri, "Base model", "config.json")
    if importlib.util.find_spec("kserve") is None:
        raise PluginError("kserve-local needs the kserve package where it runs: pip install 'aiplane[serve]'")

    sock = _bind(settings.host, settings.port, read_current(state_dir), name)
    port = sock.getsockname()[1]
    url = f"http://{_url_host(settings.host)}:{port}"
    digest = _endpoint_digest(adapter, base, name, url)
    try:
        with locked(state_dir):
            previous = read_current(state_dir)
            log = state_dir / f"server-{ctx.run_id}.log"
            ctx.log(f"starting KServe server for endpoint {name!r} on {url} (log: {log})")
            started = time.monotonic()
            proc = _start(sock, log, base_dir, adapter_dir, name, settings.host, port, settings.max_new_tokens)
            try:
                _wait_ready(ctx, proc, url, name, settings.readiness_timeout_s)
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

            if previous is not None and previous["pid"] != proc.pid and terminate(previous["pid"], name):
                ctx.log(f"stopped the previous server of {name!r} (pid {previous['pid']}, {previous.get('url')})")
            # Logs of servers that are gone (the old one, failed attempts) have served their purpose.
            for old_log in state_dir.glob("server-*.log"):
                if old_log != log:
                    remove_quietly(old_log)
    finally:
        sock.close()

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
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise InputError(
            f"{what} directory {str(path)!r} does not exist (record uri {uri!r}); kserve-local serves from "
            "this machine's disk: re-materialize it here."
        )
    if not (path / marker).is_file():
        raise InputError(f"{what} directory {str(path)!r} has no {marker}; it is not a usable {what.lower()}.")
    return path.absolute()


def _bind(host: str, port: int, current: dict[str, Any] | None, name: str) -> socket.socket:
    """A socket bound to ``host:port`` for the new server; a clear ConfigError if that is impossible."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(
            f"Serving host {host!r} cannot be resolved ({exc}); use an address such as 127.0.0.1."
        ) from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            holder = ""
            if current is not None and current.get("port") == port and is_our_server(current["pid"], name):
                holder = (
                    f" by the current server of endpoint {name!r} (pid {current['pid']}); a blue/green re-deploy "
                    "runs the new server beside the old one, so it needs another port"
                )
            raise ConfigError(
                f"port {port} on {host} is in use{holder}; choose a free port, or use port: 0 to pick one"
            ) from None
        raise ConfigError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _url_host(host: str) -> str:
    host = _WILDCARDS.get(host, host)
    return f"[{host}]" if ":" in host else host


def _start(
    sock: socket.socket,
    log: Path,
    base_dir: Path,
    adapter_dir: Path,
    name: str,
    host: str,
    port: int,
    max_new_tokens: int,
) -> subprocess.Popen:
    """Start the server detached, serving on ``sock``; this process's copy of the socket is closed."""
    fd = sock.fileno()
    cmd = [
        sys.executable, "-m", SERVER_MODULE,
        "--base-model", str(base_dir),
        "--adapter", str(adapter_dir),
        "--model-name", name,
        "--host", host,
        "--port", str(port),
        "--socket-fd", str(fd),
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
                pass_fds=(fd,),
                start_new_session=True,
            )
    finally:
        # Only the server may hold the socket: if it dies, the port must close, not hang.
        sock.close()


def _wait_ready(ctx: WorkloadContext, proc: subprocess.Popen, url: str, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    ready_url = f"{url}/v2/models/{name}/ready"
    while True:
        ctx.check_cancelled()
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
