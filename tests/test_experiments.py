"""The experiment scripts run end to end on their --quick setting (as in CI)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path) -> dict:
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "experiments" / script), "--quick", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stem = script.removesuffix(".py") + "_digits_mlp"
    assert (out / f"{stem}.csv").exists()
    return json.loads((out / f"{stem}.json").read_text())


def test_spectrum_bounds_quick(tmp_path):
    result = _run("spectrum_bounds.py", tmp_path)["summary"]
    assert set(result["fits"]) == {"normal", "rademacher", "sjlt"}
    for fit in result["fits"].values():
        assert fit["slope"] < 0  # bigger sketches are more faithful
    assert all(entry["d_lambda"] > 0 for entry in result["lambdas"])


def test_hyperparam_selection_quick(tmp_path):
    result = _run("hyperparam_selection.py", tmp_path)["summary"]
    for info in result["projectors"].values():
        assert -1 <= info["theory"]["lds_test"] <= 1
        assert info["utility"]["m"] in (64, 256)


def test_damping_rule_quick(tmp_path):
    """The damping study runs (digits, 20-subset ground truth) and its auto λ is near its grid's best."""
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "experiments" / "damping_rule.py"), "--quick", "--output_dir", str(out),
           "--cache_dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "damping_rule.json").read_text())
    assert len(result["rows"]) == 2 and result["summary"]["max_gap_auto"] < 0.03
    assert all(0 < row["d_auto"] <= row["m"] / 3 + 1e-6 for row in result["rows"])


@pytest.mark.parametrize("strategy, flags", [("ekfac", ("--model_size", "--dataset_size", "--query_size")),
                                             ("sketched", ("--model-size", "--dataset-size", "--query-size"))])  # old spellings: hidden aliases
def test_toy_scaling_single(strategy, flags):
    size, n_train, n_query = flags
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_scaling_test.py"), "--test", "single", size, "tiny",
                           n_train, "40", n_query, "8", "--strategy", strategy, "--epochs", "20"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Scores shape: (8, 40)" in proc.stdout and "Factor computation time" in proc.stdout
