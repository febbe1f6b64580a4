"""benchmarks/lds_lm.py on its --quick setting: the transformer LDS bench runs end to end."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_lds_lm_quick(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "lds_lm.py"), "--quick", "--cache_dir", str(tmp_path / "cache"),
           "--methods", "eigenbasis,eigen_topk"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {m.group(1).strip(): (m.group(2), float(m.group(3))) for m in re.finditer(r"^\| (.+?) \| ([\d,]+) \| ([\d.-]+)", proc.stdout, re.M)}
    target = rows["EKFAC, unsketched store (the target)"][1]
    assert target > 0.3  # EKFAC attributes this LM well above chance even on 20 subsets
    eig = {cols: v for name, (cols, v) in rows.items() if name.startswith("EigenbasisProjector")}
    assert "12,432" in eig and eig["12,432"] > 0.8 * target  # d/8 columns keep most of EKFAC's LDS
    topk = {cols: v for name, (cols, v) in rows.items() if name.startswith("SparseEigenbasisProjector")}
    assert topk["12,432"] > 0.9 * target and topk["12,432"] >= eig["12,432"] - 0.02
