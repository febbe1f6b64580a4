"""The command lines of the scripts in benchmarks/, experiments/ and examples/: one option style
(``--snake_case``; an old ``--kebab-case`` spelling survives only as a hidden alias) and a
``--quick`` mode in every benchmark. Read from the sources (no script is run), plus the hidden
aliases of two scripts parsed for real."""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for folder in ("benchmarks", "experiments", "examples") for p in (ROOT / folder).rglob("*.py"))


def _options(path: Path) -> list[tuple[str, bool]]:
    """(option string, hidden) of every ``*.add_argument("--...", ...)`` call with literal names."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            hidden = any(k.arg == "help" and ast.unparse(k.value) == "argparse.SUPPRESS" for k in node.keywords)
            out += [(a.value, hidden) for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
    return out


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_options_are_snake_case(path):
    kebab = [name for name, hidden in _options(path) if "-" in name[2:] and not hidden]
    assert not kebab, f"{path.name}: use --snake_case (keep an old spelling as a hidden alias: help=argparse.SUPPRESS): {kebab}"


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_every_benchmark_has_quick(path):
    assert "--quick" in [name for name, _ in _options(path)], f"{path.name} has no --quick (a CI-sized run)"


def _load(relative: str):
    path = ROOT / relative
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_old_spellings_still_parse():
    big = _load("experiments/big_model_run.py")
    old = big.parse_args(["--quick", "--num-train", "160", "--stop-after-rows", "64", "--no-resume", "--max-minutes", "2.5",
                          "--compute-dtype", "bfloat16"])
    new = big.parse_args(["--quick", "--num_train", "160", "--stop_after_rows", "64", "--no_resume", "--max_minutes", "2.5",
                          "--compute_dtype", "bfloat16"])
    assert vars(old) == vars(new) and new.num_train == 160 and new.no_resume and new.compute_dtype == "bfloat16"
    assert big.parse_args(["--quick"]).num_train == big.QUICK["num_train"]  # --quick still fills what was not given
    proj = _load("benchmarks/projector_memory.py")
    assert vars(proj.parse_args(["--d-dense", "1e4", "--block-size", "64"])) == vars(proj.parse_args(["--d_dense", "1e4", "--block_size", "64"]))
    assert proj.parse_args(["--quick"]).d == 2_000_000
