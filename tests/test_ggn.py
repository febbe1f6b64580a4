"""Exact Gauss-Newton products (float64) against the dense formula G = (1/N) Σ_i J_iᵀ H_i J_i, with
J_i from torch.func.jacrev and H_i written out: softmax cross-entropy diag(p) − ppᵀ per counted
position, squared error the identity."""
import pytest
import torch
from torch.utils.data import TensorDataset

import sketchattr as sa
from conftest import tiny_data, tiny_mlp
from dense_reference import dense_ggn, softmax_hessian
from sketchattr.curvature.ggn import GGNProducts


def flat_params(model, selection):
    named = selection.parameters(model)
    return list(named), list(named.values())


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_mlp_products_equal_the_dense_formula(kind):
    model, (x, y) = tiny_mlp(), tiny_data(n=20)
    task = sa.ClassificationTask() if kind == "classification" else sa.RegressionTask()
    target = y if kind == "classification" else torch.randn(20, 3, dtype=torch.float64)
    sel = sa.Featurizer(model, task, projector="identity", progress=False).selection()
    prods = GGNProducts(model, task, TensorDataset(x, target), sel, batch_size=6)
    names, params = flat_params(model, sel)
    hessian = softmax_hessian if kind == "classification" else (lambda z: torch.eye(3, dtype=torch.float64))
    G = dense_ggn(model, names, params, x, lambda call, xi: call(xi[None]), hessian)
    V = torch.randn(4, prods.dim, dtype=torch.float64)
    assert torch.allclose(prods(V), V @ G, rtol=1e-10, atol=1e-12)
    assert prods.passes == 1


def tiny_lm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=11, n_positions=12, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def test_padded_lm_products_equal_the_dense_formula_and_ignore_padding():
    """GPT-2 (Conv1D with biases), sequences of 3–7 tokens right-padded: only counted next-token
    positions enter H; padding to another length changes nothing; the flat layout is the
    featurizer's (its exact rows are the parameters' gradients in the same order)."""
    model, task = tiny_lm(), sa.CausalLMTask()
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(3, 11, (int(n),), generator=g)} for n in (3, 7, 5, 4, 6)]
    feat = sa.Featurizer(model, task, modules="linear", projector="identity", collate_fn=sa.PadCollator(), progress=False,
                         batch_size=2)
    sel = feat.selection()
    names, params = flat_params(model, sel)
    G = dense_ggn(model, names, params, [ex["input_ids"][None] for ex in data],
                  lambda call, ids: call(input_ids=ids).logits[0, :-1], softmax_hessian)  # position t predicts t + 1
    V = torch.randn(3, G.shape[0], dtype=torch.float64)
    expected = V @ G
    for pad_to in (None, 12):
        collate = sa.PadCollator(pad_to_multiple_of=pad_to) if pad_to else sa.PadCollator()
        prods = GGNProducts(model, task, data, sel, batch_size=2, collate_fn=collate)
        assert torch.allclose(prods(V), expected, rtol=1e-9, atol=1e-12)
    rows = feat.featurize(data).rows()
    ids = data[0]["input_ids"][None]
    loss = task.train_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    grads = torch.autograd.grad(loss, params)
    assert torch.allclose(rows[0], torch.cat([gr.reshape(-1) for gr in grads]), rtol=1e-10, atol=1e-12)


def test_products_refuse_wrong_shapes_and_restore_the_model():
    model, (x, y) = tiny_mlp(), tiny_data(n=8)
    task = sa.ClassificationTask()
    sel = sa.Featurizer(model, task, modules=["2"], projector="identity", progress=False).selection()
    model[0].weight.requires_grad_(False)
    model.train()
    prods = GGNProducts(model, task, TensorDataset(x, y), sel, batch_size=4)
    with pytest.raises(ValueError, match=r"vectors \[Q, 24\]"):
        prods(torch.zeros(2, 25, dtype=torch.float64))
    out = prods(torch.ones(1, 24, dtype=torch.float64))
    assert out.shape == (1, 24) and model.training and not model[0].weight.requires_grad and model[2].weight.requires_grad
    with pytest.raises(ValueError, match="at least one training example"):
        GGNProducts(model, task, TensorDataset(x, y), sel, max_examples=0)
