"""Runtime environments (``aiplane.core.runtimes``): provisioned once, pinned, never half-made.

A small pinned package from the package index stands in for vLLM here; the vLLM
runtime itself is provisioned by ``tests/test_vllm.py``'s first deploy.
"""

from __future__ import annotations

import threading

import pytest

from aiplane.core.errors import PluginError
from aiplane.core.runtimes import RuntimeSpec, ensure_runtime, runtimes_dir

SIX = RuntimeSpec(name="six", requirements=("six==1.17.0",), check="import six; assert six.__version__ == '1.17.0'")


def test_a_runtime_is_provisioned_once_and_found_again_without_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("AIPLANE_RUNTIMES", str(tmp_path / "runtimes"))
    lines: list[str] = []
    python = ensure_runtime(SIX, lines.append)
    assert python == tmp_path / "runtimes" / SIX.directory_name / "bin" / "python" and python.exists()
    assert SIX.directory_name.startswith("six-1.17.0-py3")
    assert any("provisioning the six runtime" in line for line in lines)
    assert any(line.startswith("[six runtime] ") for line in lines), "pip's progress reaches the log"
    again: list[str] = []
    assert ensure_runtime(SIX, again.append) == python and again == []
    assert sorted(p.name for p in (tmp_path / "runtimes").iterdir()) == [f".{SIX.directory_name}.lock", SIX.directory_name]


def test_processes_provisioning_at_once_install_it_one_time(tmp_path, monkeypatch):
    monkeypatch.setenv("AIPLANE_RUNTIMES", str(tmp_path))
    logs: list[list[str]] = [[], []]
    threads = [threading.Thread(target=ensure_runtime, args=(SIX, log.append)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(any("provisioning" in line for line in log) for log in logs) == 1


def test_a_failed_install_says_which_step_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("AIPLANE_RUNTIMES", str(tmp_path))
    broken = RuntimeSpec(name="broken", requirements=("six==1.17.0",), check="import no_such_module_in_six")
    with pytest.raises(PluginError, match=r"'check it works' failed .*To install it by hand: `python -m venv"):
        ensure_runtime(broken, lambda line: None)
    assert [p.name for p in tmp_path.iterdir()] == [f".{broken.directory_name}.lock"], "no half-made environment"


def test_the_runtime_cache_follows_aiplane_runtimes_then_the_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("AIPLANE_RUNTIMES", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert runtimes_dir() == tmp_path / "cache" / "aiplane" / "runtimes"
    monkeypatch.setenv("AIPLANE_RUNTIMES", str(tmp_path / "mine"))
    assert runtimes_dir() == tmp_path / "mine"
