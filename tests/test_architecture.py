"""The package's shape, as ARCHITECTURE.md states it: imports run one way, every package says what
it does and what it may import, and no module grows past ~500 lines without a reason at its top."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sketchattr"
MAX_LINES = 500
REASON = "One file because"


def test_import_contracts_are_kept(tmp_path):
    """`lint-imports` (import-linter): stages import downward only, no import circles (function-local
    imports count). Run from a temporary directory so its cache stays out of the repository."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    config = ROOT / "pyproject.toml"
    proc = subprocess.run([exe, "--config", str(config), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    contracts = tomllib.loads(config.read_text())["tool"]["importlinter"]["contracts"]
    assert proc.stdout.count(" KEPT") == len(contracts) >= 2


def test_layers_are_the_ones_architecture_md_lists():
    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    packages = [p.strip().removeprefix("sketchattr.") for layer in layers for p in layer.split("|")]
    text = (ROOT / "ARCHITECTURE.md").read_text()
    named = {"task": "`task.py`"}
    missing = [p for p in packages if named.get(p, f"`{p}/`") not in text]
    assert not missing, f"ARCHITECTURE.md's layer table lacks {missing}"
    top_level = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
                 if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and not p.name.startswith("__"))}
    assert top_level == set(packages), f"top-level modules outside the layers: {sorted(top_level ^ set(packages))}"


@pytest.mark.parametrize("init", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_package_says_what_it_does_and_may_import(init):
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    assert len(doc) > 80, f"{init.relative_to(ROOT)}: say what the package does in its docstring"
    if init.parent != PACKAGE:
        assert "may import" in doc.lower(), f"{init.relative_to(ROOT)}: say what the package may import"


def test_no_module_over_500_lines_without_a_reason():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        n = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if n > MAX_LINES and REASON not in doc:
            long.append(f"{path.relative_to(ROOT)} ({n} lines)")
    assert not long, f"split these, or give the reason in their docstring ('{REASON} ...'): {long}"
