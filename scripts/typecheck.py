"""Type-check aiplane with mypy, as Python imports it: ``scripts/typecheck.py [mypy arguments]``.

aiplane's packages are top-level folders (core/, plugins/, assets/, testing/) that setuptools maps
to ``aiplane.*`` (``package-dir`` in pyproject.toml), and an editable install reaches them through an
import hook mypy cannot follow. So this lays out ``build/typecheck/aiplane/`` as links to those
folders (the tree ``[tool.mypy]``'s ``mypy_path`` names), runs mypy on it, and reports each error at
the file's own path. The exit code is mypy's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"


def _link_tree() -> dict[str, str]:
    """Link ``build/typecheck/aiplane/<name>`` to each folder package-dir maps; return link prefix -> folder."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    prefixes = {}
    for package, folder in mapping.items():
        link = TREE.joinpath(*package.split("."))
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(ROOT / folder, link.parent)
        if not (link.is_symlink() and os.readlink(link) == target):
            link.unlink(missing_ok=True)
            link.symlink_to(target, target_is_directory=True)
        prefixes[f"{link.relative_to(ROOT)}/"] = f"{folder}/"
    return prefixes


def main(argv: list[str]) -> int:
    prefixes = _link_tree()
    with subprocess.Popen([sys.executable, "-m", "mypy", *argv], cwd=ROOT, stdout=subprocess.PIPE, text=True) as mypy:
        assert mypy.stdout is not None
        for line in mypy.stdout:
            for link, folder in prefixes.items():
                if line.startswith(link):
                    line = folder + line[len(link):]
                    break
            sys.stdout.write(line)
    return mypy.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
