"""experiments/big_model_run.py (--quick) end to end, interrupted + resumed; its pieces: GPT presets,
RandomTokens, Featurizer stop/resume limits, Profiler item rates."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import sketchattr as sa
from sketchattr.core.profiler import Profiler
from sketchattr.bench.data import DatasetSplit
from sketchattr.bench.data.synthetic import RandomTokens
from sketchattr.bench.models import make_model
from sketchattr.bench.models.gpt import PRESETS, GPTConfig, gpt_config, make_gpt
from sketchattr.task import CausalLMTask

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("big_model_run", ROOT / "experiments" / "big_model_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_interrupted_and_resumed_equals_uninterrupted(tmp_path, capsys):
    run = _script().main
    common = ["--quick", "--num-train", "160", "--num-query", "8", "--k", "4"]
    full = run(common + ["--store", str(tmp_path / "full.h5")])
    assert full["complete"] and full["rows_this_run"] == full["rows_stored"] == 160
    first = run(common + ["--store", str(tmp_path / "cut.h5"), "--stop-after-rows", "64", "--json", str(tmp_path / "cut.json")])
    out = capsys.readouterr().out
    assert first["rows_this_run"] == first["rows_stored"] == 64 and first["remaining"] == 96 and not first["complete"]
    assert "stopped early: 64 of 160 rows stored" in out and "extrapolated full run" in out and "peak RSS" in out
    for stage in ("build model", "featurize train", "fit SketchedInfluence", "featurize queries", "top-k", "Items/s"):
        assert stage in out
    assert first["extrapolated_seconds"]["total"] > first["stage_seconds"]["featurize train"]
    assert first["featurize_cpu_seconds"] > 0 and "featurize train CPU time" in out
    assert (tmp_path / "cut.json").exists()
    resumed = run(common + ["--store", str(tmp_path / "cut.h5")])
    assert resumed["complete"] and resumed["rows_this_run"] == 96 and resumed["rows_stored"] == 160
    a, b = sa.DiskStore(tmp_path / "full.h5"), sa.DiskStore(tmp_path / "cut.h5")
    assert np.array_equal(np.sort(a.indices), np.sort(b.indices))
    torch.testing.assert_close(b.rows()[np.argsort(b.indices)], a.rows()[np.argsort(a.indices)], rtol=1e-5, atol=1e-6)
    for key in ("proponents", "opponents"):
        assert resumed["top_k"][key] == full["top_k"][key]
        np.testing.assert_allclose(resumed["top_k"][key[:-1] + "_scores"], full["top_k"][key[:-1] + "_scores"], rtol=1e-4)
    again = run(common + ["--store", str(tmp_path / "cut.h5")])  # nothing left to do
    assert again["rows_this_run"] == 0 and again["top_k"] == full["top_k"]


def test_gpt_presets_and_registry():
    cfg = PRESETS["gpt-14m"]
    assert cfg.num_params >= 10_000_000 and cfg.num_linear == 25
    tiny = make_gpt("tiny", seed=1)
    assert sum(p.numel() for p in tiny.parameters()) == PRESETS["tiny"].num_params
    assert torch.equal(next(make_gpt("tiny", seed=1).parameters()), next(tiny.parameters()))
    assert tiny(torch.zeros(3, 16, dtype=torch.long)).shape == (3, 16, 64)
    assert gpt_config("tiny", seq_len=8, d_model=None).seq_len == 8
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=10, n_head=3)
    with pytest.raises(ValueError, match="unknown GPT preset"):
        make_gpt("gpt-1t")
    toks = RandomTokens(4, 8, 11).__getitem__
    split = DatasetSplit("lm", torch.utils.data.TensorDataset(torch.stack([toks(i) for i in range(4)])), None, None, (8,), vocab_size=11)
    model = make_model("gpt", split, preset="tiny")
    assert model.vocab_size == 11 and model.max_len == 8 and model.sketchattr_model_name == "gpt"


def test_random_tokens_deterministic_and_lazy():
    a, b = RandomTokens(10**9, 12, 50, seed=3), RandomTokens(10**9, 12, 50, seed=3)
    assert len(a) == 10**9  # nothing is materialised
    assert torch.equal(a[123_456_789], b[123_456_789]) and torch.equal(a[-1], a[10**9 - 1])
    assert not torch.equal(a[0], RandomTokens(10, 12, 50, seed=4)[0]) and not torch.equal(a[0], a[1])
    x = a[7]
    assert x.dtype == torch.int64 and x.shape == (12,) and int(x.min()) >= 0 and int(x.max()) < 50
    with pytest.raises(IndexError):
        RandomTokens(5, 4, 3)[5]
    with pytest.raises(ValueError, match="seq_len"):
        RandomTokens(5, 1, 3)


def test_featurize_stops_at_max_rows_and_resumes(tmp_path):
    model = make_gpt("tiny", seed=0)
    data = RandomTokens(40, 16, 64)
    prof = Profiler()
    feat = sa.Featurizer(model, CausalLMTask(), modules=["head", "blocks.1.fc2"], projector=sa.FactorizedProjector(3, 2),
                         batch_size=8, progress=False, profiler=prof)
    store = feat.featurize(data, store="disk", path=tmp_path / "s.h5", max_rows=12)
    assert feat.last_run.rows == 16 and feat.last_run.remaining == 24 and not feat.last_run.complete and len(store) == 16
    assert prof.calls("featurize train: gradients + sketch") == 2 and prof.items["featurize train: store write"] == 16
    store = feat.featurize(data, store="disk", path=tmp_path / "s.h5")
    assert feat.last_run.rows == 24 and feat.last_run.complete and len(store) == 40
    whole = feat.train_rows(data)
    torch.testing.assert_close(store.rows()[np.argsort(store.indices)], whole)
    with pytest.raises(ValueError, match="max_rows"):
        feat.featurize(data, max_rows=0)
    with pytest.raises(ValueError, match="max_seconds"):
        feat.featurize(data, max_seconds=-1)


def test_profiler_items_per_second():
    prof = Profiler()
    with prof.record("a", items=10):
        pass
    prof.count("a", 5)
    with prof.record("b"):
        pass
    assert prof.items == {"a": 15} and prof.rate("b") is None and prof.rate("a") > 0
    table = prof.table()
    assert "Items/s" in table.splitlines()[1] and "Items/s" not in Profiler().table()
