"""``aiplane ui``: the Dagster UI (``dagster dev``) on the instance ``aiplane up`` records to, until Ctrl-C.

``dagster dev`` runs in a session of its own, so a terminal's Ctrl-C reaches
only this process, which then stops it and everything it started (webserver,
daemon, code server) as one group; SIGTERM does the same.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping

from aiplane.core.errors import AiplaneError

__all__ = ["serve_ui", "check_port"]

_STOP_WAIT_S = 30.0


def check_port(host: str, port: int) -> None:
    """Refuse a port something else holds, before anything starts: ``dagster dev`` would only say so in its log."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise AiplaneError(f"Cannot serve the UI on {host}:{port}: {exc.strerror}. Choose another with --port (or --host).") from None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/server_info", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen) -> None:
    """Stop ``dagster dev`` as its own Ctrl-C would, then whatever of its group is left."""
    try:
        if process.poll() is None:
            # dagster dev maps SIGTERM onto its SIGINT handler and shuts its services down in order.
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=_STOP_WAIT_S)
    finally:
        # Also after a second Ctrl-C: the group is dagster dev's own session, so nothing else is in it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def serve_ui(env: Mapping[str, str], host: str, port: int, say: Callable[[str], None] = print) -> int:
    """Run ``dagster dev`` on the code location ``aiplane.assets`` with ``env`` (its ``DAGSTER_HOME``), bound
    to ``host``:``port``; print the URL once it answers; stop it on Ctrl-C or SIGTERM. Returns the exit code."""
    check_port(host, port)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    # A Python handler, not SIG_IGN (as under `cmd &` from a script): an ignored SIGINT would be inherited, and
    # dagster dev, which maps SIGTERM onto its SIGINT handler, would then ignore SIGTERM too.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # SIGTERM stops it as Ctrl-C does: left to its default, this process would die and leave dagster dev running.
    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    command = [sys.executable, "-m", "dagster", "dev", "-m", "aiplane.assets", "-h", host, "-p", str(port)]
    process = subprocess.Popen(command, env=dict(env), start_new_session=True)
    try:
        say(f"Starting the Dagster UI (DAGSTER_HOME={env['DAGSTER_HOME']}) ...")
        while not _answers(url):
            if process.poll() is not None:
                raise AiplaneError(f"dagster dev exited with code {process.returncode} before the UI answered; its log is above.")
            time.sleep(0.5)
        say(f"Dagster UI: {url}  (Ctrl-C stops it)")
        return process.wait()
    except KeyboardInterrupt:
        say("Stopping the Dagster UI ...")
        return 0
    finally:
        _stop(process)
        signal.signal(signal.SIGTERM, previous_term)
