import copy
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aiplane.core.components import FEATURE_COLUMNS
from aiplane.core.records import FeaturesRecord
from aiplane.core.workload import Runtime

TESTS = Path(__file__).parent

# Where libraries put caches and settings when told nothing: under the home directory.
_HOME_DIRS = {
    "XDG_CACHE_HOME": "cache",  # torch, pip, and everything else that follows the XDG convention
    "XDG_CONFIG_HOME": "config",
    "XDG_DATA_HOME": "data",
    "XDG_STATE_HOME": "state",
    "HF_HOME": "huggingface",  # transformers, peft, tokenizers, datasets
    "TORCH_HOME": "torch",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TRITON_CACHE_DIR": "triton",
    "MPLCONFIGDIR": "matplotlib",
    "PIP_CACHE_DIR": "pip",
}


@pytest.fixture(scope="session", autouse=True)
def no_home_state(tmp_path_factory):
    """Caches and settings go to this session's tmp dir, never to the home directory.

    Set in the environment, so the workload subprocesses, Ray's processes and KFP's
    tasks that the tests start see them too. Nothing else of the home is read:
    no test depends on what an earlier run or another tool left there. ``.ci/run``
    checks that the suite wrote nothing into an empty HOME.
    """
    root = tmp_path_factory.mktemp("home-dirs")
    saved = {name: os.environ.get(name) for name in _HOME_DIRS}
    for name, sub in _HOME_DIRS.items():
        os.environ[name] = str(root / sub)
    yield root
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# On xdist workers (`-n 2`) each worker takes one module at a time (its xdist_group, unless a test names
# another), so a module's fixtures are made once. Slowest modules first, by the --durations of recent runs:
# the modules a worker takes last are then short ones, and both finish near together. The rest keep
# collection order, and tests keep their module's order.
_SLOWEST_FIRST = (
    "test_regions.py", "test_cli.py", "test_ray_engine.py", "test_openshift_ai_3.py", "test_watsonx_gov_eval.py",
    "test_vllm.py", "test_trainers.py", "test_vllm_merged.py", "test_assets.py", "test_kfp_engine.py", "test_e2e.py",
    "test_e2e_object_storage.py", "test_prestart.py", "test_peft_trainer.py",
)  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the items
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


# The runtimes tests deploy or evaluate with: what each is, by reference, so the conftest imports no plugin.
_RUNTIMES = ("aiplane.plugins.vllm.runtime:VLLM_RUNTIME", "aiplane.plugins.watsonx_gov.evaluate:WXGOV_RUNTIME")
_PROVISION = """
import importlib, sys
from aiplane.core.runtimes import ensure_runtime
for ref in sys.argv[1:]:
    module, name = ref.split(":")
    ensure_runtime(getattr(importlib.import_module(module), name), lambda line: None)
"""


@pytest.fixture(scope="session", autouse=True)
def runtimes_provisioned_ahead(no_home_state):
    """With ``$AIPLANE_RUNTIMES`` set (CI sets it to a fresh directory), provision the vLLM and ibm-watsonx-gov
    runtimes from the session's start, in a process of its own.

    Provisioning is mostly download and unpacking: done here, it overlaps the tests that run meanwhile instead
    of stalling the first test that deploys. A test that needs a runtime still calls ``ensure_runtime`` and
    waits on its lock until it is ready. That cache outlives the session, so nothing provisioned early is
    wasted; without it, runtimes go to the session's own cache and only a test that needs one provisions it.
    Under xdist each worker starts with another runtime, so both are made at once.
    """
    refs = list(_RUNTIMES if os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0" else reversed(_RUNTIMES))
    if not os.environ.get("AIPLANE_RUNTIMES"):
        yield
        return
    # Its own session: the environment is fixed at start, whatever tests set later, and it is stopped as a group.
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROVISION, *refs],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    yield
    if proc.poll() is None:
        # SIGINT, so ensure_runtime removes its half-made environment before it exits.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def workload_path(monkeypatch):
    """Make tests/_workloads.py importable in workload subprocesses."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(TESTS))
    return TESTS


EXAMPLE_CLOUD = TESTS.parent / "examples" / "aiplane-example-cloud"


@pytest.fixture(scope="session")
def example_cloud(tmp_path_factory):
    """The example third-party distribution, pip-installed into its own directory (put it on a path to use it)."""
    target = tmp_path_factory.mktemp("site")
    # Build from a copy: an in-tree build would leave build/ and egg-info in examples/.
    source = shutil.copytree(EXAMPLE_CLOUD, tmp_path_factory.mktemp("src") / EXAMPLE_CLOUD.name)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
    )
    return target


@pytest.fixture
def clean_plugin_env(monkeypatch):
    monkeypatch.delenv("AIPLANE_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("AIPLANE_DISABLE_PLUGINS", raising=False)


# The real CRD schemas live in shared/ beside the checkout (as CI lays it out); AIPLANE_CRDS_DIR overrides.
CRDS = Path(os.environ.get("AIPLANE_CRDS_DIR") or TESTS.parents[1] / "shared" / "crds")


def crd_validator(filename: str, version: str | None = None):
    """A JSON-schema validator for a CRD's openAPIV3Schema, closed to unknown fields.

    The API server rejects unknown fields (kubectl's default ``--validate=strict``);
    JSON Schema allows them unless told, so every object that lists its
    properties is closed, except where the CRD preserves unknown fields.
    """
    import jsonschema
    from _k8s_api_double import _load_yaml

    path = CRDS / filename
    if not path.is_file():
        pytest.skip(f"CRD {filename} not found in {CRDS} (set AIPLANE_CRDS_DIR to the shared crds folder)")
    # Parsed once per session with libyaml (the CRDs run to megabytes); a copy, since the schema is closed below.
    crd = copy.deepcopy(next(d for d in _load_yaml(path) if d.get("kind") == "CustomResourceDefinition"))
    spec = next(v for v in crd["spec"]["versions"] if (v["name"] == version if version else v.get("storage")))
    schema = spec["schema"]["openAPIV3Schema"]

    def strict(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)
        return node

    return jsonschema.Draft202012Validator(strict(schema))


def stop_endpoints(home: Path) -> None:
    """Stop every model server a chain under ``home`` started, even when a later step failed."""
    from aiplane.plugins.vllm import _server

    for directory in _server.servers_dir(home).glob("*"):
        info = _server.server_info(directory)
        if info is not None:
            _server.terminate(info)
            _server.forget(directory)


def features_record(rows: list[dict[str, str]], **fields) -> FeaturesRecord:
    """A FeaturesRecord of ``rows`` as the trainer tests hand it to ``train`` (no table behind it); ``fields`` override."""
    defaults = dict(
        uri="iceberg://test/aiplane.tickets?snapshot=1", digest="iceberg-snapshot:1", table="aiplane.tickets",
        snapshot_id=1, row_count=len(rows), columns=FEATURE_COLUMNS,
        residency=tuple(sorted({r["residency"] for r in rows})),
    )  # fmt: skip
    return FeaturesRecord(**{**defaults, **fields})


class CheckpointingRuntime(Runtime):
    """A workload runtime, as an engine that restarts work gives one: it keeps the last checkpoint in
    ``store`` and can crash right after the report of step ``crash_at``, so resuming is tested without an engine."""

    def __init__(self, store: Path, crash_at: int | None = None, every: int = 5):
        self.store, self.crash_at, self.checkpoint_every = store, crash_at, every

    def report(self, metrics, checkpoint_dir=None):
        if checkpoint_dir is not None:
            shutil.rmtree(self.store, ignore_errors=True)
            shutil.copytree(checkpoint_dir, self.store)
        if metrics["step"] == self.crash_at:
            raise RuntimeError("worker lost")

    def latest_checkpoint(self):
        return self.store if self.store.exists() else None
