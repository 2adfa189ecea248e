"""Each example third-party package, installed as a stranger would install it, passes its own conformance tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import TESTS

EXAMPLES = TESTS.parent / "examples"
NEW_KINDS = ("aiplane-example-parquet-store", "aiplane-example-http-serving", "aiplane-example-json-publisher")


def test_every_example_package_installed_passes_its_own_kit_tests(tmp_path, example_cloud):
    sources = [shutil.copytree(EXAMPLES / name, tmp_path / "src" / name, ignore=shutil.ignore_patterns("build", "*.egg-info"))
               for name in NEW_KINDS]  # fmt: skip
    site = tmp_path / "site"
    # Built from copies, one pip run for all: an in-tree build would leave build/ and egg-info in examples/.
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--no-compile",
            "--disable-pip-version-check", "--target", str(site), *map(str, sources),
        ],
        check=True,
    )
    tests = [str(s / "tests") for s in sources] + [str(EXAMPLES / "aiplane-example-cloud" / "tests")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(example_cloud)])}
    # From the copies' parent, so each package is imported from where pip installed it, not from its source folder.
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), *tests],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "4 passed" in run.stdout, run.stdout[-1000:]
    for name in NEW_KINDS:
        installed = subprocess.run([sys.executable, "-c", f"import importlib.metadata as m; print(m.distribution({name!r}).entry_points)"],
                                   env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "group='aiplane'" in installed, f"{name} registers no plugin in the aiplane entry-point group"
