import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.fixture
def workload_path(monkeypatch):
    """Make tests/_workloads.py importable in workload subprocesses."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(TESTS))
    return TESTS


@pytest.fixture
def clean_plugin_env(monkeypatch):
    monkeypatch.delenv("AIPLANE_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("AIPLANE_DISABLE_PLUGINS", raising=False)
