"""One way to pass queries to every scorer: provenance checks, the same inputs, the same return types,
and the Kronfluence-Task adapter's sign (float64, against the dense formula)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import sketchattr as sa
from conftest import tiny_data, tiny_mlp
from dense_reference import ce_loss, per_example_grads


def _setup(projector="sjlt", m=32, seed=0, model=None):
    model = model or tiny_mlp()
    x, y = tiny_data()
    feat = sa.Featurizer(model, sa.ClassificationTask(), projector=projector, m=m, seed=seed, batch_size=5, progress=False)
    return model, feat, feat.featurize((x, y)), (x[:4], y[:4])


# ---------------------------------------------------------------------------- provenance
@pytest.mark.parametrize("other", ["seed", "projector", "model", "modules"])
def test_rows_of_another_sketch_are_refused_by_every_scorer(other):
    model, feat, store, q = _setup()
    if other == "seed":
        alien = sa.Featurizer(model, sa.ClassificationTask(), projector="sjlt", m=32, seed=1, progress=False)
    elif other == "projector":
        alien = sa.Featurizer(model, sa.ClassificationTask(), projector="gaussian", m=32, seed=0, progress=False)
    elif other == "model":
        alien = sa.Featurizer(tiny_mlp(seed=5), sa.ClassificationTask(), projector="sjlt", m=32, seed=0, progress=False)
    else:
        alien = sa.Featurizer(model, sa.ClassificationTask(), modules=["2"], projector="sjlt", m=32, seed=0, progress=False)
    rows = alien.query_rows(q)
    field = {"seed": "projector", "projector": "projector", "model": "model_fingerprint", "modules": "modules"}[other]
    si = sa.SketchedInfluence(damping=0.1).fit(store)
    with pytest.raises(sa.QueryMismatchError, match=field):
        si.score(rows)
    with pytest.raises(sa.QueryMismatchError, match=field):
        si.top_k(rows, k=2)
    tr = sa.TracIn([feat]).fit(store)
    with pytest.raises(sa.QueryMismatchError, match=field):
        tr.score(rows)
    # the store's own featurizer is accepted, and the subset of queries keeps its provenance
    own = feat.query_rows(q)
    assert torch.allclose(si.score(own[1:3]), si.score(own)[1:3], atol=1e-12)


def test_plain_tensor_is_refused_unless_vouched_for():
    _, feat, store, q = _setup()
    si = sa.SketchedInfluence(damping=0.1).fit(store)
    rows = feat.query_rows(q)
    with pytest.raises(TypeError, match="cannot tell which projector"):
        si.score(rows.rows)
    assert torch.equal(si.score(sa.QueryRows.unchecked(rows.rows)), si.score(rows))
    # rows given as a plain tensor have no provenance to check: plain query tensors are fine there
    plain = sa.SketchedInfluence(damping=0.1).fit(torch.randn(10, 32, dtype=torch.float64))
    assert plain.score(torch.randn(3, 32, dtype=torch.float64)).shape == (3, 10)


def test_ekfac_refuses_sketched_rows_and_foreign_prepared_queries():
    model, feat, store, q = _setup()
    factors = sa.fit_factors(model, sa.ClassificationTask(), tiny_data(), kind="ekfac", progress=False)
    ek = sa.EKFACScorer(factors, feat, damping=0.1).fit(store)
    with pytest.raises(TypeError, match="already sketched"):
        ek.score(feat.query_rows(q))
    other = sa.Featurizer(model, sa.ClassificationTask(), projector="sjlt", m=32, seed=3, batch_size=5, progress=False)
    foreign = sa.EKFACScorer(factors, other, damping=0.1).fit(other.featurize(tiny_data())).prepare_queries(q)
    with pytest.raises(sa.StoreMismatchError, match="another featurizer"):
        ek.score(foreign)
    with pytest.raises(TypeError, match="tuple of tensors"):
        ek.score(torch.zeros(4, 32))


# ---------------------------------------------------------------------------- one set of inputs, one set of types
def _query_forms(q):
    ds = TensorDataset(*q)
    return {"tuple": q, "dataset": ds, "loader": DataLoader(ds, batch_size=3, shuffle=True), "list": [ds[i] for i in range(len(ds))]}


def test_every_scorer_takes_the_same_query_inputs_and_returns_the_same_types():
    model, feat, store, q = _setup(projector="identity", m=None)
    factors = sa.fit_factors(model, sa.ClassificationTask(), tiny_data(), kind="ekfac", progress=False)
    scorers = {
        "sketched_influence": sa.SketchedInfluence(damping=0.1, featurizer=feat).fit(store),
        "ekfac": sa.EKFACScorer(factors, feat, damping=0.1).fit(store),
        "tracin": sa.TracIn([feat]).fit(store),
    }
    rows = feat.query_rows(q)
    for name, scorer in scorers.items():
        ref = scorer.score(q)
        assert isinstance(ref, torch.Tensor) and ref.shape == (4, 24), name
        forms = dict(_query_forms(q), rows=rows, prepared=scorer.prepare_queries(q) if hasattr(scorer, "prepare_queries") else rows)
        for form, queries in forms.items():
            assert torch.allclose(scorer.score(queries), ref, atol=1e-10), (name, form)
            top = scorer.top_k(queries, k=3)
            assert all(isinstance(t, torch.Tensor) for t in (top.proponents, top.proponent_scores, top.opponents, top.opponent_scores))
            assert torch.equal(top.proponents, torch.as_tensor(scorer.train_indices)[ref.argsort(dim=1, descending=True)[:, :3]])
    # with the identity projector every scorer's scores are exact: SketchedInfluence's λ and EKFAC's
    # differ, but TracIn (plain dot product) must equal −q·g
    g = per_example_grads(model, ce_loss, *tiny_data())
    assert torch.allclose(scorers["tracin"].score(q), -rows.rows @ g.T, atol=1e-10)


def test_dataloader_with_its_own_collate_needs_the_featurizer_to_know_it():
    _, feat, store, q = _setup()
    si = sa.SketchedInfluence(damping=0.1, featurizer=feat).fit(store)
    loader = DataLoader(TensorDataset(*q), batch_size=2, collate_fn=lambda b: tuple(torch.stack(t) for t in zip(*b)))
    with pytest.raises(ValueError, match="collate_fn"):
        si.score(loader)


def test_sketched_influence_without_featurizer_says_how_to_score_a_dataset():
    _, _, store, q = _setup()
    with pytest.raises(TypeError, match="featurizer="):
        sa.SketchedInfluence(damping=0.1).fit(store).score(q)


# ---------------------------------------------------------------------------- Kronfluence Task adapter
class KronfluenceStyleTask:
    """A task written for Kronfluence 1.0 (its method names, argument order and loss-like measurement)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(F.softmax(logits.detach(), -1), 1).squeeze(1)
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")  # loss-like, as Kronfluence expects

    def get_influence_tracked_modules(self):
        return ["0", "2"]

    def get_attention_mask(self, batch):
        return None


def test_kronfluence_task_adapter_gives_kronfluence_scores_not_negated():
    """Kronfluence's score is ∇f_Kᵀ (F + λI)⁻¹ ∇ℓ_i (f_K loss-like: positive = helpful). Through the
    adapter sketchattr's scores equal it; a Task made by renaming the methods gives its negation."""
    model = tiny_mlp()
    x, y = tiny_data()
    task = sa.KronfluenceTask(KronfluenceStyleTask())
    assert task.modules == ["0", "2"]
    feat = sa.Featurizer(model, task, projector="identity", batch_size=5, progress=False)
    lam = 0.05
    scores = sa.SketchedInfluence(damping=lam, method="eigen").fit(feat.featurize((x, y))).score(feat.query_rows((x[:4], y[:4])))
    g = per_example_grads(model, ce_loss, x, y)
    gq = per_example_grads(model, ce_loss, x[:4], y[:4])  # ∇f_K of the loss-like measurement
    fisher = g.T @ g / len(g)
    kronfluence = gq @ torch.linalg.solve(fisher + lam * torch.eye(g.shape[1], dtype=g.dtype), g.T)
    assert torch.allclose(scores, kronfluence, atol=1e-9)

    class Renamed(sa.Task):  # the silent mistake the adapter prevents
        def train_loss(self, model, batch, sample=False):
            return KronfluenceStyleTask().compute_train_loss(batch, model, sample)

        def measurement(self, model, batch):
            return KronfluenceStyleTask().compute_measurement(batch, model)

    naive = sa.Featurizer(model, Renamed(), projector="identity", batch_size=5, progress=False)
    wrong = sa.SketchedInfluence(damping=lam, method="eigen").fit(naive.featurize((x, y))).score(naive.query_rows((x[:4], y[:4])))
    assert torch.allclose(wrong, -kronfluence, atol=1e-9)


def test_kronfluence_task_adapter_refuses_what_it_cannot_replay():
    with pytest.raises(TypeError, match="compute_measurement"):
        sa.KronfluenceTask(object())

    class PostProcess(KronfluenceStyleTask):  # multiple choice: sums each example's C rows
        enable_post_process_per_sample_gradient = True

        def post_process_per_sample_gradient(self, module_name, gradient):
            return gradient.reshape(-1, 4, *gradient.shape[1:]).sum(dim=1)

        def get_attention_mask(self, batch):
            return batch

    replayed = sa.KronfluenceTask(PostProcess())
    assert replayed.mask(torch.ones(2, 4, 5)).shape == (2, 4, 5)  # the group sum the engine does: accepted
    with pytest.raises(NotImplementedError, match=r"post-processes.*\[B, C, T\] mask"):
        replayed.mask(torch.ones(2, 5))  # no groups declared: refused, not ignored

    class OtherPostProcess(PostProcess):
        def post_process_per_sample_gradient(self, module_name, gradient):
            return gradient * 2

    with pytest.raises(NotImplementedError, match="does something else"):
        sa.KronfluenceTask(OtherPostProcess()).mask(torch.ones(2, 4, 5))

    class PerModuleMask(KronfluenceStyleTask):
        def get_attention_mask(self, batch):
            return {"0": torch.ones(2, 3)}

    with pytest.raises(NotImplementedError, match="one mask per module"):
        sa.KronfluenceTask(PerModuleMask()).mask((torch.zeros(2, 5), torch.zeros(2)))


def test_kronfluence_task_adapter_applies_the_attention_mask():
    class Masked(KronfluenceStyleTask):
        def get_attention_mask(self, batch):
            return torch.tensor([[1, 1, 0]])

    assert torch.equal(sa.KronfluenceTask(Masked()).mask(None), torch.tensor([[1, 1, 0]]))
