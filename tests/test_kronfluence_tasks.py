"""Kronfluence-shaped Tasks (tests/kronfluence_shaped_tasks.py) through ``sa.KronfluenceTask``, unchanged.

Float64, against the dense formula: per-example gradients by autograd on each example alone
(cut to its real tokens), through the task's own methods, over the modules Kronfluence would
track. Identity store: scores = ∇f_Kᵀ ∇ℓ_i (Kronfluence's sign); EKFAC: ∇f_Kᵀ M ∇ℓ_i with M
from the fitted factors (eigenvalues checked against the explicit gradients). The tasks read
the module they are given (``model.parameters()``, ``checkpoint_sequential``, ``model.train()``),
so a wrapper in its place fails here.
"""
import pytest
import torch
from torch import nn

import sketchattr as sa
from sketchattr.featurize import HookMismatchError
from dense_reference import dense_curvature_inverse
from kronfluence_shaped_tasks import SETUPS, LanguageModelingTask, MultipleChoiceTask, linear_gpt2, token_data

transformers = pytest.importorskip("transformers")  # a dev dependency: installed in CI


def explicit_rows(setup, examples, names, kind):
    """[n, d] gradients of compute_train_loss / compute_measurement, one example at a time."""
    named = dict(setup.model.named_parameters())
    params = [named[n] for n in names]
    rows = []
    for ex in examples:
        batch = setup.alone(ex)
        task = setup.task
        loss = task.compute_train_loss(batch, setup.model) if kind == "train" else task.compute_measurement(batch, setup.model)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    setup.model.eval()
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(SETUPS))
def test_kronfluence_shaped_task_scores_equal_dense_formula(name):
    setup = SETUPS[name]()
    task = sa.KronfluenceTask(setup.task)
    feat = sa.Featurizer(setup.model, task, projector="identity", batch_size=4, progress=False, engine="hooks")
    store = feat.featurize(setup.train)
    sel = feat.selection()
    if setup.default_modules is not None:  # Kronfluence's default: leaf Linear and Conv2d (no BatchNorm)
        assert list(sel.names) == setup.default_modules
    names = [p for group in sel.param_names for p in group]
    G = explicit_rows(setup, setup.train, names, "train")
    Q = explicit_rows(setup, setup.queries, names, "query")  # ∇f_K: Kronfluence's loss-like measurement

    assert torch.allclose(feat.train_rows(setup.train), G, atol=1e-10, rtol=1e-8)
    assert torch.allclose(feat.query_rows(setup.queries).rows, -Q, atol=1e-10, rtol=1e-8)  # f = −f_K
    identity = sa.IdentityScorer(feat).fit(store).score(setup.queries)
    assert torch.allclose(identity, Q @ G.T, atol=1e-9, rtol=1e-8)

    factors = sa.fit_factors(setup.model, task, setup.train, kind="ekfac", fisher="empirical", batch_size=4, progress=False)
    M = dense_curvature_inverse(factors, feat.engine.blocks, G)
    scores = sa.EKFACScorer(factors, feat).fit(store).score(setup.queries)
    assert torch.allclose(scores, Q @ M @ G.T, atol=1e-9, rtol=1e-7)
    assert setup.model.training is False  # the featurizer restores eval mode after a task that calls model.train()


@pytest.mark.parametrize("name", ["regression_mlp", "conv_bn_inplace", "roberta_multiple_choice"])
def test_true_fisher_sampling_runs_on_the_module_and_is_reproducible(name):
    """compute_train_loss(sample=True) draws targets from the model (torch.normal / multinomial on the
    real module's outputs); the fit is seeded, so two fits are equal and a third seed is not."""
    setup = SETUPS[name]()
    task = sa.KronfluenceTask(setup.task)
    fit = lambda seed: sa.fit_factors(setup.model, task, setup.train, kind="ekfac", batch_size=4, seed=seed, progress=False)
    a, b, c = fit(0), fit(0), fit(1)
    module = next(iter(a.tensors))
    assert torch.equal(a.tensors[module]["Lambda"], b.tensors[module]["Lambda"])
    assert not torch.allclose(a.tensors[module]["Lambda"], c.tensors[module]["Lambda"], rtol=1e-3, atol=0)


def test_hf_gradient_checkpointing_really_recomputes():
    """The GPT-2 set-up's blocks run forward twice per featurized batch (once more in the backward):
    the hook engine captures the first run only, and its rows are still exact (previous test)."""
    setup = SETUPS["gpt2_checkpointing"]()
    calls = []
    setup.model.transformer.h[0].attn.c_attn.register_forward_hook(lambda *a: calls.append(1))
    feat = sa.Featurizer(setup.model, sa.KronfluenceTask(setup.task), projector="identity", batch_size=4, progress=False)
    feat.train_rows(setup.train[:4])
    assert len(calls) == 2 * 2  # the verification's batch too: two forwards, each recomputed once


def test_reentrant_checkpointing_is_named_not_silent():
    """Reentrant checkpointing runs the block's forward without autograd, so no hook sees a gradient there."""
    model = linear_gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = model.double().eval()
    from kronfluence_shaped_tasks import TrainingModeLMTask, gpt2_blocks

    feat = sa.Featurizer(model, sa.KronfluenceTask(TrainingModeLMTask(gpt2_blocks())), projector="identity", batch_size=4,
                         progress=False, engine="hooks")
    with pytest.raises(HookMismatchError, match="use_reentrant"):
        feat.train_rows(token_data(4, 1, 16))


def test_multiple_choice_mask_groups_rows_and_refuses_a_flat_mask():
    setup = SETUPS["roberta_multiple_choice"]()

    class FlatMask(MultipleChoiceTask):
        def get_attention_mask(self, batch):
            return batch["attention_mask"].reshape(-1, batch["attention_mask"].shape[-1])

    feat = sa.Featurizer(setup.model, sa.KronfluenceTask(FlatMask(3)), projector="identity", batch_size=3, progress=False)
    with pytest.raises(Exception, match=r"\[B, C, T\]"):
        feat.train_rows(setup.train)


def test_kronfluence_default_modules_are_leaf_linear_and_conv2d():
    model = SETUPS["bert_padding"]().model
    task = sa.KronfluenceTask(LanguageModelingTask(None))
    sel = sa.Featurizer(model, task, progress=False).selection()
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert list(sel.names) == expected and "bert.embeddings.word_embeddings" not in sel.names
