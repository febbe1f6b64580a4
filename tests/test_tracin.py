"""TracIn over checkpoints against dense per-example autograd formulas (float64)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import saved_checkpoints, tiny_data, tiny_mlp
from dense_reference import ce_loss, margin_fn, per_example_grads
from sketchattr import ClassificationTask, Featurizer, MemoryStore, StoreMismatchError, TracIn, tracin_from_checkpoints
from sketchattr.sample import make_sampler
from sketchattr.score.topk import top_k as full_top_k
from sketchattr.store import DiskStore

LRS = [0.5, 0.2, 0.05]


@pytest.fixture
def ckpts():
    return [tiny_mlp(seed=s) for s in (0, 1, 2)]


def _dense(models, x, y, xq, yq, lrs, param_names=None, proj=None, cos=False):
    total = 0
    for model, lr in zip(models, lrs):
        g = per_example_grads(model, ce_loss, x, y, param_names)
        q = per_example_grads(model, margin_fn, xq, yq, param_names)
        if proj is not None:
            g, q = g @ proj.T, q @ proj.T
        if cos:
            g = g / g.norm(dim=1, keepdim=True)
            q = q / q.norm(dim=1, keepdim=True)
        total = total - lr * q @ g.T
    return total


def test_dot_equals_dense_sum_over_checkpoints(ckpts, data):
    x, y = data
    tr = tracin_from_checkpoints(ckpts, ClassificationTask(), (x, y), learning_rates=LRS, progress=False)
    scores = tr.score((x[:5], y[:5]))
    ref = _dense(ckpts, x, y, x[:5], y[:5], LRS)
    assert scores.shape == (5, len(x)) and scores.dtype == torch.float64
    assert torch.allclose(scores, ref, atol=1e-10, rtol=1e-10)
    # sign: an example scored against itself (margin vs CE gradients point oppositely) is a proponent
    own = torch.diagonal(scores[:, :5])
    assert (own > 0).all()
    # self-influence: Σ_c η_c ‖g_c,i‖²
    sq = sum(lr * per_example_grads(m, ce_loss, x, y).pow(2).sum(1) for m, lr in zip(ckpts, LRS))
    assert torch.allclose(tr.self_influence(), sq, atol=1e-10)


def test_single_checkpoint_and_scalar_lr(mlp, data):
    x, y = data
    tr = tracin_from_checkpoints([mlp], ClassificationTask(), (x, y), learning_rates=0.1, progress=False)
    assert torch.allclose(tr.score((x[:3], y[:3])), _dense([mlp], x, y, x[:3], y[:3], [0.1]), atol=1e-10)


def test_cos_variant_equals_normalised_dense(ckpts, data):
    x, y = data
    tr = tracin_from_checkpoints(ckpts[:2], ClassificationTask(), (x, y), learning_rates=LRS[:2], variant="cos", progress=False)
    ref = _dense(ckpts[:2], x, y, x[:4], y[:4], LRS[:2], cos=True)
    assert torch.allclose(tr.score((x[:4], y[:4])), ref, atol=1e-10)
    assert torch.allclose(tr.self_influence(), torch.full((len(x),), sum(LRS[:2]), dtype=torch.float64))


def test_last_n_layers_restricts_dense_gradients(ckpts, data):
    x, y = data
    tr = tracin_from_checkpoints(ckpts, ClassificationTask(), (x, y), LRS, modules=1, progress=False)
    assert tr.featurizers[0].selection().names == ("2",)
    ref = _dense(ckpts, x, y, x[:4], y[:4], LRS, param_names={"2.weight", "2.bias"})
    assert torch.allclose(tr.score((x[:4], y[:4])), ref, atol=1e-10)


def test_gaussian_projector_equals_explicit_matrix(ckpts, data):
    x, y = data
    tr = tracin_from_checkpoints(ckpts, ClassificationTask(), (x, y), LRS, projector="gaussian", m=16, seed=3, progress=False)
    feat = tr.featurizers[0]
    P = feat.projector.matrix(feat.selection().dims)
    assert P.shape == (16, 66)
    ref = _dense(ckpts, x, y, x[:4], y[:4], LRS, proj=P)
    assert torch.allclose(tr.score((x[:4], y[:4])), ref, atol=1e-9)


def test_sampled_indices_deterministic_stratified_and_shared(ckpts):
    x, y = tiny_data(n=60)
    sampler = make_sampler("stratified", key="labels", rate=0.2, seed=4)
    a = tracin_from_checkpoints(ckpts, ClassificationTask(), (x, y), LRS, sampler=sampler, progress=False)
    b = tracin_from_checkpoints(ckpts, ClassificationTask(), (x, y), LRS, sampler=make_sampler("stratified", key="labels", rate=0.2, seed=4), progress=False)
    np.testing.assert_array_equal(a.train_indices, b.train_indices)
    for s in a.stores:
        np.testing.assert_array_equal(s.indices, a.train_indices)
    counts = np.bincount(y.numpy(), minlength=3)
    got = np.bincount(y.numpy()[a.train_indices], minlength=3)
    np.testing.assert_array_equal(got, np.minimum(counts, np.maximum(1, np.round(0.2 * counts))))
    scores = a.score((x[:3], y[:3]))
    full = _dense(ckpts, x, y, x[:3], y[:3], LRS)
    assert torch.allclose(scores, full[:, a.train_indices], atol=1e-10)
    c = tracin_from_checkpoints(ckpts, ClassificationTask(), (x, y), LRS, sampler=make_sampler("uniform", rate=0.2, seed=5), progress=False)
    assert not np.array_equal(c.train_indices, a.train_indices)


def test_top_k_matches_full_argsort(ckpts, data):
    x, y = data
    tr = tracin_from_checkpoints(ckpts, ClassificationTask(), (x, y), LRS, progress=False)
    tr.block_rows = 5  # several streamed blocks
    q = (x[:4], y[:4])
    scores = tr.score(q)
    top = tr.top_k(q, k=6)
    order = torch.argsort(scores, dim=1, descending=True).numpy()
    np.testing.assert_array_equal(top.proponents, tr.train_indices[order[:, :6]])
    np.testing.assert_array_equal(top.opponents, tr.train_indices[order[:, ::-1][:, :6]])
    ref = full_top_k(scores, tr.train_indices, 6)
    np.testing.assert_allclose(top.proponent_scores, ref.proponent_scores)
    # stores cut into different block sizes are re-aligned row by row
    s1 = tr.stores[1]
    s1.iter_blocks = lambda block_rows=None, _f=type(s1).iter_blocks: _f(s1, 7)
    assert torch.allclose(tr.score(q), scores, atol=1e-12)


def test_query_cache_counts_and_clear(ckpts, data, monkeypatch):
    x, y = data
    tr = tracin_from_checkpoints(ckpts[:2], ClassificationTask(), (x, y), LRS[:2], progress=False)
    calls = []
    for f in tr.featurizers:
        orig = f.query_rows
        monkeypatch.setattr(f, "query_rows", lambda ds, *a, _o=orig, **k: calls.append(1) or _o(ds, *a, **k))
    q = (x[:4], y[:4])
    s1 = tr.score(q)
    assert len(calls) == 2
    s2 = tr.score(q)
    tr.top_k(q, k=3)
    assert len(calls) == 2 and torch.equal(s1, s2)
    mem = tr.memory_footprint()
    assert mem["query_cache_entries"] == 2 and mem["query_cache_bytes"] == 2 * 4 * 66 * 8
    assert mem["train_rows_total_bytes"] == 2 * len(x) * 66 * 8
    tr.clear_query_cache()
    assert tr.memory_footprint()["query_cache_bytes"] == 0
    tr.score(q)
    assert len(calls) == 4
    nocache = TracIn(tr.featurizers, LRS[:2], cache_queries=False).fit(tr.stores)
    nocache.score(q)
    nocache.score(q)
    assert len(calls) == 8


def test_fit_checks(ckpts, data, tmp_path):
    x, y = data
    task = ClassificationTask()
    feats = [Featurizer(m, task, progress=False) for m in ckpts[:2]]
    stores = [f.featurize((x, y), store="disk", path=tmp_path / "s.h5", checkpoint=f"ckpt{c}") for c, f in enumerate(feats)]
    tr = TracIn(feats, LRS[:2]).fit([DiskStore(tmp_path / "s.h5", checkpoint=f"ckpt{c}") for c in range(2)])
    s = tr.score((x[:3], y[:3]))
    assert s.dtype == torch.float32  # streamed in the disk rows' precision
    assert torch.allclose(s.double(), _dense(ckpts[:2], x, y, x[:3], y[:3], LRS[:2]), atol=1e-5)
    with pytest.raises(ValueError, match="stores for"):
        TracIn(feats, LRS[:2]).fit(stores[:1])
    with pytest.raises(StoreMismatchError):
        TracIn(feats, LRS[:2]).fit(stores[::-1])  # checkpoint 0's featurizer against checkpoint 1's rows
    other = feats[1].featurize((x, y), store=MemoryStore(), indices=np.arange(10))
    with pytest.raises(StoreMismatchError, match="different train rows"):
        TracIn(feats, LRS[:2]).fit([stores[0], other])


def test_cli_end_to_end(tmp_path, capsys):
    from sketchattr.bench.models.mlp import make_mlp

    x, y = tiny_data(n=30)
    torch.save({"x": x.float(), "y": y}, tmp_path / "train.pt")
    np.savez(tmp_path / "test.npz", x=x[:4].float().numpy(), y=y[:4].numpy())
    cks = []
    for s in range(2):
        p = tmp_path / f"ck{s}.pt"
        torch.save(make_mlp(in_dim=5, hidden=7, out_dim=3, seed=s).state_dict(), p)
        cks.append(str(p))
    argv = [
        "tracin", "--model-def", "sketchattr.bench.models.mlp:make_mlp",
        "--model-kwargs", '{"in_dim": 5, "hidden": 7, "out_dim": 3}',
        "--checkpoints", *cks, "--learning-rates", "0.1", "0.05",
        "--train-data", str(tmp_path / "train.pt"), "--test-data", str(tmp_path / "test.npz"),
        "--top-k", "3", "--test-indices", "0", "2", "--output", str(tmp_path / "out.json"),
        "--device", "cpu", "--no-progress",
    ]
    from sketchattr.cli.main import main

    assert main(argv + ["--mode", "batch", "--show", "1"]) == 0
    text = capsys.readouterr().out  # says what it wrote: path, shape, seconds, the shown top-k
    assert f"wrote {tmp_path / 'out.json'}: top-3 proponents/opponents of 2 test examples over 30 of 30 train rows" in text
    assert "2 checkpoints" in text and "seconds: " in text and "score " in text
    assert "test 0 (label " in text and "helps: " in text and "hurts: " in text and "test 2 (label" not in text
    rep = json.loads((tmp_path / "out.json").read_text())
    assert [r["test_index"] for r in rep["results"]] == [0, 2]
    models = [make_mlp(in_dim=5, hidden=7, out_dim=3, seed=s) for s in range(2)]
    ref = _dense([m.double() for m in models], x, y, x[[0, 2]], y[[0, 2]], [0.1, 0.05])
    for r, row in zip(rep["results"], ref):
        order = torch.argsort(row, descending=True)
        assert [p["train_index"] for p in r["proponents"]] == order[:3].tolist()
        assert [p["train_index"] for p in r["opponents"]] == order.flip(0)[:3].tolist()
        assert np.allclose([p["score"] for p in r["proponents"]], row[order[:3]].numpy(), rtol=1e-4, atol=1e-6)
    assert rep["settings"]["learning_rates"] == [0.1, 0.05] and rep["settings"]["n_scored_train"] == 30
    assert set(rep["timings"]) >= {"featurize_train_s", "score_s", "total_s"}
    assert rep["memory"]["train_rows_total_bytes"] == 2 * 30 * 66 * 4

    # single mode + projection + stratified sampling + last layer, through `python -m sketchattr`
    argv2 = [a if a != str(tmp_path / "out.json") else str(tmp_path / "out2.json") for a in argv]
    argv2 += ["--mode", "single", "--use-projection", "--projection-dim", "8", "--projection-type", "sjlt",
              "--sample-rate", "0.5", "--stratify-by", "labels", "--num-last-layers", "1", "--variant", "cos"]
    proc = subprocess.run([sys.executable, "-m", "sketchattr", *argv2], check=True, capture_output=True, text=True)
    assert f"wrote {tmp_path / 'out2.json'}" in proc.stdout and "helps:" not in proc.stdout  # no --show: summary only
    rep2 = json.loads((tmp_path / "out2.json").read_text())
    assert rep2["settings"]["projector"]["type"] == "sjlt" and rep2["settings"]["modules"]["names"] == ["2"]
    assert rep2["settings"]["n_scored_train"] < 30 and rep2["settings"]["sampler"]["type"] == "stratified"
    assert all(len(r["proponents"]) == 3 for r in rep2["results"])


def test_cli_source_scorer_equals_the_library(tmp_path, capsys):
    """``sketchattr tracin --scorer source``: c_ℓ = η_ℓ × steps_ℓ, the library's SOURCE scores."""
    from sketchattr import ClassificationTask, source_from_checkpoints
    from sketchattr.cli.main import main

    x, y, models, argv = saved_checkpoints(tmp_path, "source")
    argv = argv[:-2] + ["--learning-rates", "0.1", "0.05"] + argv[-2:]
    assert main(argv + ["--steps-per-segment", "20", "--fisher", "empirical"]) == 0
    assert "(source, 2 checkpoints" in capsys.readouterr().out
    rep = json.loads((tmp_path / "out.json").read_text())
    assert rep["settings"]["lr_steps"] == [2.0, 1.0] and "SOURCE" in rep["settings"]["sign"]
    ref = source_from_checkpoints(models, ClassificationTask(), (x.float(), y), [2.0, 1.0], fisher="empirical",
                                  batch_size=64, progress=False).score((x[:4].float(), y[:4]))
    for r, row in zip(rep["results"], ref):
        order = torch.argsort(row, descending=True)
        assert [p["train_index"] for p in r["proponents"]] == order[:3].tolist()
        assert np.allclose([p["score"] for p in r["proponents"]], row[order[:3]].numpy(), rtol=1e-5)
    tracin = json.loads((tmp_path / "out.json").read_text())
    assert main(["tracin", *argv[1:-2], "--output", str(tmp_path / "t.json")]) == 0  # TracIn differs from SOURCE
    assert json.loads((tmp_path / "t.json").read_text())["results"] != tracin["results"]
    for extra, message in ((["--scorer", "source"], "needs --steps_per_segment"),
                           (["--scorer", "source", "--steps-per-segment", "5", "--variant", "cos"], "no cosine variant"),
                           (["--scorer", "source", "--steps-per-segment", "5", "6", "7"], "one value >= 0 per checkpoint"),
                           (["--steps-per-segment", "5"], "for --scorer source")):
        capsys.readouterr()
        assert main(argv[:-2] + extra) != 0
        err = capsys.readouterr().err
        assert "error: " in err and message in err
