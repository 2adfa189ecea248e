"""The vLLM servers on this machine: one per base model, shared by every endpoint of it and the adapters
loaded on it, and one per whole model an endpoint serves.

State, under the aiplane home:

* ``serving/_vllm/<server>/server.json``: the live server (pid, port, url, flags), and what finds every
  process of it (:func:`aiplane.core.processes.start_tree`'s handle), written as it starts.
  A base model's server is ``<base>``, the base model's digest, shortened; a
  whole model's (an ``sft`` model, a full ``distill`` student) is
  ``<model>-<endpoint>``, as it answers to that endpoint's name only.
  ``.lock`` beside it serializes starting the server, changing its adapters
  and stopping it across processes; ``server.log`` is its output.
* ``serving/<endpoint>/endpoint.json``: which server the endpoint is on and what
  it serves. On a base model's server: the endpoint's adapters, newest first,
  each loaded under ``<endpoint>@<digest>``, and which one the endpoint name
  routes to. On a whole model's server: that model (``full_model: true``). On
  a merged endpoint's server (``<base>+<endpoint>``, ``mode: merged``): the
  adapters merged into the base model's weights (``merged/<digest>`` beside
  ``endpoint.json``), the current one loaded into the server.
  ``.lock`` beside it serializes the endpoint's deploys and its stop.

Requests address the endpoint name. vLLM's in-place load swaps the weights
behind that name, so a new adapter (or a rollback) never changes the URL or
the model name clients use, and never restarts the server. A whole model is
served by a server of its own under the endpoint name, so switching to or from
one moves the endpoint to another server, at another URL. A merged endpoint's
server serves one set of weights under the endpoint's name; a new adapter's
merged weights replace them in place (:func:`swap_weights`), so its URL stays too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

from aiplane.core.artifacts import atomic_write_text, file_lock
from aiplane.core.errors import ConfigError, InputError, WorkloadError
from aiplane.core.processes import process_token, start_tree, stop_tree

from .runtime import SERVER_MODULE, server_args, server_env, version_name

__all__ = [
    "ENDPOINT_STATE",
    "alive",
    "check_endpoint_name",
    "endpoint_dir",
    "endpoints_on",
    "forget",
    "healthy",
    "held_by_ours",
    "load",
    "loaded",
    "locked",
    "merged_server_dir",
    "model_server_dir",
    "port_free",
    "read_json",
    "release",
    "server_dir",
    "server_info",
    "servers_dir",
    "smoke",
    "start",
    "swap_weights",
    "tail",
    "terminate",
    "unload",
    "url_of",
    "version_name",
    "write_json",
]

ENDPOINT_STATE = "endpoint.json"
_SERVER_STATE = "server.json"
_SYSTEM_TMP = "/tmp" if os.path.isdir("/tmp") else None
_STOP_GRACE_S = 20.0
_LOG_TAIL_LINES = 25
# A minimal chat template for a tokenizer that has none (the built-in tiny Granite): the messages'
# text, one per line, then the assistant's turn. A real Granite brings its own.
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
)


def check_endpoint_name(name: Any) -> str:
    """``name`` if it is usable as a directory name and a model name; ConfigError otherwise."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?", name) or ".." in name:
        raise ConfigError(
            f"Endpoint name {name!r} is not usable: use 1-64 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit (e.g. 'tickets')."
        )
    return name


def server_dir(home: Path, base_digest: str) -> Path:
    """Where the base model's server is recorded: beside the endpoints' directories, under a name no
    endpoint can have (they start with a letter or digit)."""
    return servers_dir(home) / base_digest.split(":")[-1][:16]


def model_server_dir(home: Path, model_digest: str, endpoint: str) -> Path:
    """Where the server of a whole model served as ``endpoint`` is recorded: it answers to that endpoint's
    name only (vLLM's ``--served-model-name``), so another endpoint serving the same model has its own."""
    return servers_dir(home) / f"{model_digest.split(':')[-1][:16]}-{check_endpoint_name(endpoint)}"


def merged_server_dir(home: Path, base_digest: str, endpoint: str) -> Path:
    """Where the server of ``endpoint`` in merged mode is recorded: the base model's weights with the endpoint's
    adapter merged in, answering to the endpoint's name only. ``+`` is in no endpoint name or digest."""
    return servers_dir(home) / f"{base_digest.split(':')[-1][:16]}+{check_endpoint_name(endpoint)}"


def servers_dir(home: Path) -> Path:
    return home / "serving" / "_vllm"


def endpoint_dir(home: Path, name: str) -> Path:
    return home / "serving" / check_endpoint_name(name)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def locked(directory: Path) -> contextlib.AbstractContextManager[None]:
    """Hold a server directory's lock: the server and everything loaded on it change under it."""
    return file_lock(directory / ".lock")


def server_info(directory: Path) -> dict[str, Any] | None:
    info = read_json(directory / _SERVER_STATE)
    return info if info is not None and isinstance(info.get("pid"), int) else None


def alive(info: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """Whether the process ``info`` names is still our vLLM server on its port (a pid may be reused)."""
    if not info:
        return False
    if info.get("token"):
        return process_token(info["pid"]) == info["token"]
    import psutil

    try:
        proc = psutil.Process(info["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return SERVER_MODULE in cmdline and f"--port={info['port']}" in cmdline


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``port`` now; connections of a stopped server in TIME_WAIT
    do not count (vLLM binds with ``SO_REUSEADDR`` too)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def start(
    directory: Path,
    python: Path,
    base_dir: Path,
    *,
    served_name: str = "base",
    host: str,
    port: int,
    flags: dict[str, Any],
    readiness_timeout_s: float,
    log: Callable[[str], None],
    check_cancelled: Callable[[], None],
    dev: bool = False,
    preload: Sequence[str] = (),
) -> dict[str, Any]:
    """Start the server for the model in ``base_dir`` detached, wait until it is healthy, record it.

    It answers to ``served_name``: ``base`` for a base model's server, whose
    endpoints are adapters loaded on it; the endpoint's name for a whole model's.
    ``flags`` are :func:`~.runtime.server_args`'s keyword arguments (recorded, so a
    later deploy can tell whether they changed), ``dev`` and ``preload``
    :func:`~.runtime.server_env`'s (recorded too). ``port`` 0 picks a free one; a
    given port must be free. Raises WorkloadError with the tail of the server's
    log if it exits or is not healthy in time.
    """
    if port == 0:
        port = _free_port(host)
    elif not port_free(host, port):
        raise ConfigError(
            f"Port {port} on {host} is held by another process, so the vLLM server cannot start there; "
            "stop that process, or set the vllm target's port to another one (0 picks a free port)."
        )
    extra = list(flags.get("extra", ()))
    if not _has_chat_template(base_dir):
        template = directory / "chat_template.jinja"
        template.write_text(_CHAT_TEMPLATE)
        extra.append(f"--chat-template={template}")
    args = server_args(str(base_dir), served_name, host=host, port=port, **{**flags, "extra": extra})
    server_log = directory / "server.log"
    url = url_of(host, port)
    log(f"starting the vLLM server for {base_dir.name} on {url} (log: {server_log})")
    started = time.monotonic()
    # The server outlives the workload that starts it, so its sockets and scratch files go in a
    # directory of its own, not the workload's temporary one (removed when the workload ends); a
    # short one, in the machine's temporary directory, as a unix socket's path may not exceed 107 bytes.
    scratch = Path(tempfile.mkdtemp(prefix=f"aiplane-vllm-{directory.name[:8]}-", dir=_SYSTEM_TMP))
    env = {**server_env(lora=flags.get("lora", True), dev=dev, preload=preload), "TMPDIR": str(scratch)}
    info = {
        "host": host, "port": port, "url": url, "base_dir": str(base_dir), "flags": flags,
        "served_name": served_name, "dev": dev, "preload": list(preload), "weights": str(base_dir),
        "log": str(server_log), "scratch": str(scratch),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip

    def note(handle: dict[str, Any]) -> None:
        # Recorded at once (start_tree holds a cancel until it is): if this process dies while the server
        # loads, the next deploy, stop or cleanup finds it.
        info.update(handle)
        write_json(directory / _SERVER_STATE, info)

    with open(server_log, "ab") as out:
        # A tree of its own (session, and a marker every process of it inherits): nothing aimed at the deploying
        # process reaches it, and its record is enough to stop all of it later, after its root was killed too.
        proc, _ = start_tree([str(python), "-m", SERVER_MODULE, *args], env, cwd=directory, output=out, record=note)
    try:
        _wait_ready(proc, url, server_log, started + readiness_timeout_s, readiness_timeout_s, check_cancelled)
    except BaseException:  # interrupted too: the half-started server is stopped; re-raised
        forget(directory, grace_s=0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        raise
    info["startup_s"] = round(time.monotonic() - started, 3)
    write_json(directory / _SERVER_STATE, info)
    log(f"vLLM server ready on {url} after {info['startup_s']:.1f} s (pid {proc.pid})")
    return info


def _wait_ready(proc, url: str, server_log: Path, deadline: float, timeout_s: float, check_cancelled) -> None:
    while not healthy(url):
        check_cancelled()
        if proc.poll() is not None:
            raise WorkloadError(
                f"The vLLM server exited with code {proc.returncode} before it was ready. "
                f"Last lines of {server_log}:\n{tail(server_log)}"
            )
        if time.monotonic() > deadline:
            raise WorkloadError(
                f"The vLLM server was not ready within readiness_timeout_s={timeout_s:g} s "
                f"(raise it if the model needs longer to load). Last lines of {server_log}:\n{tail(server_log)}"
            )
        time.sleep(0.5)


def forget(directory: Path, grace_s: float = _STOP_GRACE_S) -> None:
    """Drop the record of a server, and its scratch directory, once no process of it is left: what is left
    (the workers of a server whose first process was killed) is stopped first, as :func:`terminate` does."""
    info = server_info(directory)
    if info is not None:
        terminate(info, grace_s)
        if info.get("scratch"):
            shutil.rmtree(info["scratch"], ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (directory / _SERVER_STATE).unlink()


def _has_chat_template(base_dir: Path) -> bool:
    if (base_dir / "chat_template.jinja").is_file() or (base_dir / "chat_template.json").is_file():
        return True
    config = read_json(base_dir / "tokenizer_config.json") or {}
    return bool(config.get("chat_template"))


def terminate(info: dict[str, Any] | None, grace_s: float = _STOP_GRACE_S) -> bool:
    """Stop the server ``info`` names and every process it started (SIGTERM, SIGKILL after ``grace_s``), also
    after its first process was killed; whether any of them was running. A reused pid is never signalled."""
    if not info:
        return False
    if info.get("tree"):
        return stop_tree(info, grace_s)
    # A record from before servers were started as trees names a process group only, stopped while its root runs.
    return alive(info) and stop_tree({"pid": info["pid"], "token": process_token(info["pid"])}, grace_s)


def _call(url: str, method: str = "GET", body: dict[str, Any] | None = None, timeout: float = 60) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise WorkloadError(f"The vLLM server at {url} did not answer: {getattr(exc, 'reason', exc)}") from None


def loaded(url: str) -> dict[str, str]:
    """The adapters loaded on the server: model name → adapter path."""
    status, text = _call(f"{url}/v1/models", timeout=10)
    if status != 200:
        raise WorkloadError(f"{url}/v1/models answered HTTP {status}: {text[:300]}")
    return {m["id"]: m.get("root", "") for m in json.loads(text).get("data", []) if m.get("parent")}


def load(url: str, name: str, path: Path, inplace: bool = False) -> None:
    """Load the adapter in ``path`` as model ``name``; ``inplace`` swaps the weights of a name already loaded."""
    status, text = _call(
        f"{url}/v1/load_lora_adapter", "POST", {"lora_name": name, "lora_path": str(path), "load_inplace": inplace}
    )
    if status != 200:
        raise InputError(f"The vLLM server refused adapter {path} as {name!r} (HTTP {status}): {_message(text)}")


def swap_weights(directory: Path, weights: Path) -> None:
    """Replace the weights the server in ``directory`` (a merged endpoint's, its lock held) serves by those in
    ``weights`` (a model directory of the same architecture), in place: same process, same URL.

    Generation pauses while the requests in flight finish on the old weights;
    those that arrive meanwhile wait, and run on the new ones. The prefix cache
    is reset before generation resumes, so no KV computed with the old weights
    is reused. The server's record then names the weights it serves.
    """
    info = server_info(directory)
    if info is None:
        raise WorkloadError(f"No vLLM server is recorded in {directory}")
    url = info["url"]
    _ok(url, "/pause?mode=wait", "pause generation")
    try:
        # Dev mode's RPC passes string arguments only; the worker's reload_weights takes a path.
        _ok(url, "/collective_rpc", "reload its weights", {"method": "reload_weights", "kwargs": {"weights_path": str(weights)}},
            timeout=600)  # fmt: skip
        _ok(url, "/reset_prefix_cache", "reset its prefix cache")
    finally:
        _ok(url, "/resume", "resume generation")
    write_json(directory / _SERVER_STATE, {**info, "weights": str(weights)})


def _ok(url: str, route: str, what: str, body: dict[str, Any] | None = None, timeout: float = 60) -> None:
    status, text = _call(f"{url}{route}", "POST", body if body is not None else {}, timeout)
    if status != 200:
        raise WorkloadError(f"The vLLM server at {url} could not {what} (HTTP {status}): {_message(text)}")


def unload(url: str, name: str) -> bool:
    """Unload model ``name``; False if it was not loaded."""
    status, text = _call(f"{url}/v1/unload_lora_adapter", "POST", {"lora_name": name})
    if status == 404:
        return False
    if status != 200:
        raise WorkloadError(f"The vLLM server could not unload {name!r} (HTTP {status}): {_message(text)}")
    return True


def smoke(url: str, model: str, timeout: float = 120) -> str:
    """One real completion from ``model``: the adapter answers before anything routes to it."""
    status, text = _call(
        f"{url}/v1/completions", "POST", {"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}, timeout
    )
    if status != 200:
        raise InputError(f"{model!r} failed its first completion (HTTP {status}): {_message(text)}")
    return json.loads(text)["choices"][0]["text"]


def _message(text: str) -> str:
    try:
        error = json.loads(text)
        return str(error.get("error", {}).get("message") or error.get("message") or error)[:500]
    except (ValueError, AttributeError):
        return text[:500]


def endpoints_on(home: Path, key: str) -> list[dict[str, Any]]:
    """The endpoint states of every endpoint served by server ``key`` under ``home``."""
    found = []
    for path in sorted((home / "serving").glob(f"*/{ENDPOINT_STATE}")):
        state = read_json(path)
        if state is not None and state.get("server") == key:
            found.append(state)
    return found


def tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    kept = [line.rsplit("\r", 1)[-1] for line in text.rstrip("\n").split("\n")]
    return "\n".join(kept[-lines:]) or "(log is empty)"


def held_by_ours(home: Path, port: int) -> bool:
    """Whether one of the live servers recorded under ``home`` listens on ``port``."""
    return any(
        info is not None and alive(info) and info["port"] == port for info in map(server_info, servers_dir(home).glob("*"))
    )


def release(home: Path, directory: Path, state: dict[str, Any]) -> bool:
    """Stop serving endpoint ``state`` from the server in ``directory`` (its lock held): unload the endpoint's
    adapters when other endpoints still use the server, else stop the server. Whether it was running."""
    info = server_info(directory)
    running = alive(info)
    others = [s for s in endpoints_on(home, directory.name) if s.get("endpoint") != state.get("endpoint")]
    if not others:
        terminate(info)
        forget(directory)
    elif running and info is not None and not state.get("full_model"):
        for version in state.get("versions", []):
            unload(info["url"], version["lora_name"])
        unload(info["url"], state["endpoint"])
    return running
