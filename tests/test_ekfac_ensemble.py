"""sa.ekfac_ensemble against its formula written out (float64): per model c, EKFAC's
s_c = −∇f_c(Q) M_c ∇ℓ_c(train)ᵀ with M_c built from the fitted eigenbases and explicit per-example
gradients; the ensemble is the mean over c of s_c divided by its RMS over the train rows per query."""
import pytest
import torch

import sketchattr as sa
from conftest import saved_checkpoints, tiny_data, tiny_mlp
from dense_reference import ce_loss, dense_curvature_inverse, margin_fn, per_example_grads
from sketchattr.score.checkpoints import featurize_checkpoints


def checkpoints():
    """Two "checkpoints" of one run: the model and a perturbed copy (float64)."""
    a, b = tiny_mlp(seed=0), tiny_mlp(seed=0)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    return [a, b]


def dense_member_scores(ens, models, x, y, xq, yq):
    out = []
    for member, model in zip(ens.members, models):
        G = per_example_grads(model, ce_loss, x, y)
        M = dense_curvature_inverse(member.factors, member.featurizer.engine.blocks, G)
        out.append(-per_example_grads(model, margin_fn, xq, yq) @ M @ G.T)
    return out


def test_rms_averaged_ekfac_members_equal_the_dense_formula():
    x, y = tiny_data(n=24)
    xq, yq = tiny_data(n=4, seed=5)
    models = checkpoints()
    ens = sa.ekfac_ensemble(models, sa.ClassificationTask(), (x, y), fisher="empirical", batch_size=8, progress=False)
    members = dense_member_scores(ens, models, x, y, xq, yq)
    expected = sum(s / s.pow(2).mean(1, keepdim=True).sqrt() for s in members) / len(members)
    assert torch.allclose(ens.score((xq, yq)), expected, rtol=1e-8, atol=1e-12)
    raw = sa.ekfac_ensemble(models, sa.ClassificationTask(), (x, y), fisher="empirical", normalize="none", batch_size=8,
                            progress=False)
    assert torch.allclose(raw.score((xq, yq)), (members[0] + members[1]) / 2, rtol=1e-8, atol=1e-12)
    assert not torch.allclose(members[0] / members[0].norm(), members[1] / members[1].norm(), atol=1e-3)  # members differ


def test_each_member_gets_its_own_sparse_eigenbasis():
    """A projector factory builds every member's store in its own eigenbasis: at full width the scores are
    the exact ones; narrower, each store has m columns."""
    x, y = tiny_data(n=24)
    xq, yq = tiny_data(n=4, seed=5)
    models, task = checkpoints(), sa.ClassificationTask()
    exact = sa.ekfac_ensemble(models, task, (x, y), fisher="empirical", batch_size=8, progress=False)
    d = exact.members[0].featurizer.selection().total
    full = sa.ekfac_ensemble(models, task, (x, y), fisher="empirical", batch_size=8, progress=False,
                             projector=lambda f: sa.SparseEigenbasisProjector(2 * d, f))
    scores, reference = full.score((xq, yq)), exact.score((xq, yq))
    assert scores.dtype == torch.float32  # the sparse store keeps float32 values
    assert torch.allclose(scores.double(), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
    narrow = sa.ekfac_ensemble(models, task, (x, y), fisher="empirical", batch_size=8, progress=False,
                               projector=lambda f: sa.SparseEigenbasisProjector(8, f))
    projectors = [m.featurizer.projector for m in narrow.members]
    assert all(p.m == 8 for p in projectors) and projectors[0] is not projectors[1]
    assert [p.factors for p in projectors] == [m.factors for m in narrow.members]
    assert narrow.score((xq, yq)).shape == (4, 24)


def test_errors_name_what_is_wrong():
    x, y = tiny_data(n=24)
    with pytest.raises(ValueError, match="at least one model"):
        sa.ekfac_ensemble([], sa.ClassificationTask(), (x, y), progress=False)
    with pytest.raises(ValueError, match="3 projectors for 2 models"):
        featurize_checkpoints(checkpoints(), sa.ClassificationTask(), (x, y), projector=["identity"] * 3, progress=False)


def test_cli_tracin_scorer_ekfac_equals_the_library(tmp_path, capsys):
    """``sketchattr tracin --scorer ekfac``: the library's ekfac_ensemble over the saved checkpoints."""
    import json

    import numpy as np

    from sketchattr.cli.main import main

    x, y, models, argv = saved_checkpoints(tmp_path, "ekfac")
    assert main(argv + ["--fisher", "empirical"]) == 0
    assert "(ekfac, 2 checkpoints" in capsys.readouterr().out
    rep = json.loads((tmp_path / "out.json").read_text())
    assert "EKFAC" in rep["settings"]["sign"] and rep["settings"]["learning_rates"] is None
    ref = sa.ekfac_ensemble(models, sa.ClassificationTask(), (x.float(), y), fisher="empirical", progress=False).score(
        (x[:4].float(), y[:4]))
    for r, row in zip(rep["results"], ref):
        order = torch.argsort(row, descending=True)
        assert [p["train_index"] for p in r["proponents"]] == order[:3].tolist()
        assert np.allclose([p["score"] for p in r["proponents"]], row[order[:3]].numpy(), rtol=1e-5)
    for extra, message in ((["--learning_rates", "0.1"], "no --learning_rates"), (["--variant", "cos"], "no --variant cos"),
                           (["--steps_per_segment", "5"], "--scorer ekfac does not use it")):
        capsys.readouterr()
        assert main(argv + extra) != 0
        err = capsys.readouterr().err
        assert "error: " in err and message in err
