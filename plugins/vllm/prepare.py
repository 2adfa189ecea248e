"""Serve while training: the server an endpoint will need starts on the base model's weights while its adapter
trains, so the deploy finds it ready (:meth:`.target.VllmLocal.prepare`).

The server is the one the deploy uses: in ``merged`` mode the endpoint's own
(``<base>+<endpoint>``, base weights until the deploy swaps the merged ones in),
in ``lora`` mode the base model's shared one. It starts in a thread of the
orchestrating process, under the server's lock, so a deploy that comes first
waits for it rather than starting a second. A server already running is left as
it is.

What this process started and no endpoint uses when it exits (its training
failed, or the run never reached the deploy) is stopped then: a failed run
leaves no server it started for nothing. The next run starts one again, while
it trains.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import shutil
import threading
import types
from pathlib import Path
from typing import Any

from aiplane.core.errors import AiplaneError, WorkloadCancelled
from aiplane.core.storage import local_path

from . import _server as server

__all__ = ["prepare", "release_unused"]

_log = logging.getLogger("aiplane.vllm")
_started: dict[Path, dict[str, Any]] = {}  # server directory -> its thread, cancel event, home
_guard = threading.Lock()


def prepare(settings: Any, base_uri: str, base_digest: str, endpoint: str, home: Path) -> Path | None:
    """Start, in the background, the server ``endpoint`` will be deployed on; its directory, or None when
    there is nothing to prepare here (a base model not on this machine's disk, an invalid name)."""
    try:
        server.check_endpoint_name(endpoint)
        base_dir = local_path(base_uri)
    except AiplaneError:
        return None
    if not (base_dir / "config.json").is_file():
        return None
    merged = settings.adapters == "merged"
    sdir = server.merged_server_dir(home, base_digest, endpoint) if merged else server.server_dir(home, base_digest)
    with _guard:
        if sdir in _started or _healthy(sdir):
            return sdir
        entry: dict[str, Any] = {"cancel": threading.Event(), "home": home, "started": False}
        thread = threading.Thread(
            target=_start, args=(settings, base_dir.absolute(), endpoint if merged else "base", merged, sdir, entry),
            name=f"aiplane-vllm-prepare-{sdir.name}", daemon=True,
        )  # fmt: skip
        entry["thread"] = thread
        _started[sdir] = entry
        if len(_started) == 1:
            atexit.register(release_unused)
    thread.start()
    return sdir


def _healthy(sdir: Path) -> bool:
    info = server.server_info(sdir)
    return server.alive(info) and server.healthy(info["url"])


def _start(settings, base_dir: Path, served_name: str, merged: bool, sdir: Path, entry: dict[str, Any]) -> None:
    from .deploy import (
        _running_server,  # the deploy's own start: same flags, environment and restore
    )
    from .runtime import ensure_vllm

    cancel, home = entry["cancel"], entry["home"]

    def check_cancelled() -> None:
        if cancel.is_set():
            raise WorkloadCancelled("the process that prepared the vLLM server is exiting")

    ctx = types.SimpleNamespace(log=_log.info, check_cancelled=check_cancelled)
    try:
        python = ensure_vllm(_log.info, cancel)
        sdir.mkdir(parents=True, exist_ok=True)
        with server.locked(sdir):
            check_cancelled()
            info = _running_server(ctx, home, sdir, python, base_dir, settings, served_name=served_name, merged=merged)
            entry["started"] = bool(info.get("started_here"))
        _log.info("vLLM server for %s ready on %s while the adapter trains", sdir.name, info["url"])
    except WorkloadCancelled:  # the process is exiting (its run ended or was terminated): nothing to report
        _log.debug("the vLLM server %s was not prepared: its process is exiting", sdir.name)
    except Exception as exc:  # noqa: BLE001 - a hint failed: the deploy starts the server itself, and says why if it cannot
        _log.warning("could not prepare the vLLM server %s: %s", sdir.name, exc)


def release_unused(timeout_s: float = 60.0) -> list[Path]:
    """Stop every server this process prepared that no endpoint uses (a start still under way is cancelled);
    the directories of those stopped. Run at exit."""
    with _guard:
        prepared = dict(_started)
        _started.clear()
    stopped = []
    for sdir, entry in prepared.items():
        entry["cancel"].set()
        entry["thread"].join(timeout_s)
        with contextlib.suppress(OSError), server.locked(sdir):
            # Not one found running: only what this process started (a start cancelled halfway stopped itself).
            if entry.get("started") and not server.endpoints_on(entry["home"], sdir.name):
                server.forget(sdir, grace_s=5)
                stopped.append(sdir)
        if not server.endpoints_on(entry["home"], sdir.name) and server.server_info(sdir) is None:
            _remove_empty(sdir, Path(entry["home"]))
    return stopped


def _remove_empty(sdir: Path, home: Path) -> None:
    """Remove a server directory this process made and nothing serves from, then its parents while empty, up to
    ``home``: a run that deployed nothing leaves no ``serving/`` behind (its logs went with the server)."""
    shutil.rmtree(sdir, ignore_errors=True)
    for parent in sdir.parents:
        if parent == home or home not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty (another endpoint's state), or gone already: stop climbing
            break
