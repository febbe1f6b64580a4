"""SOURCE (training-aware influence over segments) against its formula, written out (float64):
explicit per-example gradients by autograd at each checkpoint, explicit matrices exp(−cH) and
(I − exp(−cH))H⁻¹ built from the fitted EKFAC eigenbases."""
import math

import pytest
import torch

import sketchattr as sa
from conftest import tiny_data, tiny_mlp
from dense_reference import dense_spectral_matrix, margin_fn, per_example_grads, ce_loss
from sketchattr.score.source import Segment, SourceInfluence, segment_weight


def checkpoints():
    """Two "checkpoints" of one run: the model and a perturbed copy (float64)."""
    a = tiny_mlp(seed=0)
    b = tiny_mlp(seed=0)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return a, b


def segment(model, x, y, c):
    task = sa.ClassificationTask()
    factors = sa.fit_factors(model, task, (x, y), kind="ekfac", fisher="empirical", batch_size=8, progress=False)
    feat = sa.Featurizer(model, task, projector="identity", batch_size=8, progress=False)
    return Segment(factors, feat, c), feat.featurize((x, y))


def test_scores_equal_the_unrolled_formula_written_out():
    x, y = tiny_data(n=24)
    xq, yq = tiny_data(n=4, seed=5)
    (sa_, store_a), (sb, store_b) = [segment(m, x, y, c) for m, c in zip(checkpoints(), (0.4, 0.9))]
    scores = SourceInfluence([sa_, sb]).fit([store_a, store_b]).score((xq, yq))
    final = sb.featurizer.model
    q = per_example_grads(final, margin_fn, xq, yq)  # ∇f at the end of training (the last checkpoint)
    blocks = sa_.featurizer.engine.blocks
    expected = torch.zeros_like(scores)
    u = q.T  # [d, n_query]
    for seg in reversed([sa_, sb]):
        c = seg.lr_steps
        F = dense_spectral_matrix(seg.factors, blocks, lambda lam: segment_weight(lam, c))
        S = dense_spectral_matrix(seg.factors, blocks, lambda lam: torch.exp(-c * lam.clamp(min=0)))
        G = per_example_grads(seg.featurizer.model, ce_loss, x, y)
        expected -= (F @ u).T @ G.T
        u = S @ u
    assert torch.allclose(scores, expected, rtol=1e-9, atol=1e-12)


def test_short_segments_score_like_tracin_at_the_final_query():
    """c → 0: S → I and F → c·I, so the scores are −Σ_ℓ c_ℓ ∇f(θ_T)ᵀ ∇ℓ(θ_ℓ)."""
    x, y = tiny_data(n=24)
    xq, yq = tiny_data(n=4, seed=5)
    cs = (1e-9, 3e-9)
    segs = [segment(m, x, y, c) for m, c in zip(checkpoints(), cs)]
    scores = SourceInfluence([s for s, _ in segs]).fit([st for _, st in segs]).score((xq, yq))
    q = per_example_grads(segs[-1][0].featurizer.model, margin_fn, xq, yq)
    expected = -sum(c * q @ per_example_grads(s.featurizer.model, ce_loss, x, y).T for (s, _), c in zip(segs, cs))
    assert torch.allclose(scores, expected, rtol=1e-6, atol=1e-18)


def test_segment_weight_limits_and_errors():
    lam = torch.tensor([0.0, 1e-12, 1.0, 50.0], dtype=torch.float64)
    w = segment_weight(lam, 2.0)
    assert float(w[0]) == 2.0 and math.isclose(float(w[1]), 2.0, rel_tol=1e-9)
    assert math.isclose(float(w[2]), (1 - math.exp(-2.0)) / 1.0, rel_tol=1e-12)
    assert math.isclose(float(w[3]), 1 / 50.0, rel_tol=1e-12)
    x, y = tiny_data(n=24)
    seg, store = segment(tiny_mlp(), x, y, 1.0)
    with pytest.raises(ValueError, match="lr_steps"):
        SourceInfluence([Segment(seg.factors, seg.featurizer, -1.0)])
    with pytest.raises(ValueError, match="one store per segment"):
        SourceInfluence([seg, seg]).fit([store])
    with pytest.raises(ValueError, match="at least one segment"):
        SourceInfluence([])


def test_source_from_checkpoints_equals_segments_built_by_hand(tmp_path):
    x, y = tiny_data(n=24)
    xq, yq = tiny_data(n=4, seed=5)
    models, cs = checkpoints(), (0.4, 0.9)
    by_hand = [segment(m, x, y, c) for m, c in zip(models, cs)]
    expected = SourceInfluence([s for s, _ in by_hand]).fit([st for _, st in by_hand]).score((xq, yq))
    task = sa.ClassificationTask()
    for store, rtol in (("none", 1e-12), ("disk", 1e-5)):  # the disk store keeps float32 rows
        got = sa.source_from_checkpoints(models, task, (x, y), cs, fisher="empirical", batch_size=8, store=store,
                                         path=tmp_path / "source.h5", progress=False)
        assert got.stores[1].path == tmp_path / "source.h5" if store == "disk" else True
        assert torch.allclose(got.score((xq, yq)).double(), expected, rtol=rtol, atol=1e-6 * float(expected.abs().max()))
    sampled = sa.source_from_checkpoints(models, task, (x, y), 0.5, fisher="empirical", batch_size=8, progress=False,
                                         sampler=sa.make_sampler("uniform", rate=0.5, seed=3))
    assert sampled.n_train == 12 and sampled.score((xq, yq)).shape == (4, 12)
    with pytest.raises(ValueError, match="3 lr_steps for 2 checkpoints"):
        sa.source_from_checkpoints(models, task, (x, y), (1.0, 2.0, 3.0), progress=False)
