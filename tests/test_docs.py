import re
from pathlib import Path

from aiplane.core import hookspecs

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _readme_test_command() -> str:
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    return next(b for b in blocks if b.endswith("pytest"))


def test_ci_runs_the_readme_test_command_verbatim():
    assert _readme_test_command() in (ROOT / ".ci" / "run").read_text().splitlines()


def test_ci_runs_the_test_command_in_an_empty_home_and_then_checks_that_home():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    fresh_home = lines.index('home=$(mktemp -d -t aiplane-ci-home.XXXXXX)')
    uses_it = lines.index('export HOME="$home"')
    command = lines.index(_readme_test_command())
    checks_it = next(i for i, line in enumerate(lines) if 'find . -mindepth 1' in line and 'cd "$home"' in line)
    assert fresh_home < uses_it < command < checks_it


def test_every_hook_is_documented_in_the_readme():
    hooks = [name for name in dir(hookspecs) if name.startswith("aiplane_")]
    assert hooks
    for name in hooks:
        assert re.search(rf"^#### `{name}\(", README, re.M), f"hook {name} is missing from the README"


def test_core_imports_no_engine_or_orchestrator():
    import subprocess
    import sys

    heavy = ("torch", "ray", "kfp", "kserve", "pyiceberg", "pyarrow", "transformers", "peft", "dagster", "matplotlib", "openlineage")
    code = "import sys, aiplane.core, aiplane.core.worker, aiplane.core.factsheet; print(' '.join(sorted(m for m in sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert not {m for m in loaded if m.split(".")[0] in heavy}


def test_every_test_the_fault_table_names_exists():
    section = README.split("### Faults, and what each costs", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]
    named = {name for row in rows for name in re.findall(r"`(test_\w+)`", row.rsplit("|", 2)[-2])}
    assert len(rows) >= 8 and named
    defined = {m for f in (ROOT / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)\(", f.read_text(), re.M)}
    assert named <= defined, f"the fault table names tests that do not exist: {sorted(named - defined)}"
