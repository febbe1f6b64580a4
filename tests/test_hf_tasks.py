"""Hugging Face tasks, the pad collator, module selection by kind / pattern / LoRA / last blocks,
per-token scores and optimizer-aware (LESS / TrackStar) gradients, against explicit formulas."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sketchattr as sa
from padded_lm import autograd_rows, tiny_hf
from sketchattr.store import StoreMismatchError
from sketchattr.task import logits_of

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LM = sa.CausalLMTask()


def sequences(n, seed=0, vocab=64, lo=4, hi=14):
    """Variable-length token sequences (lists of dicts, as a text dataset gives them)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g)}
            for _ in range(n)]


def batch_of(example):
    return sa.PadCollator()([example])


# ---------------------------------------------------------------------------- 1. tasks, collator
def test_pad_collator():
    out = sa.PadCollator(pad_token_id=0, pad_to_multiple_of=4)([{"input_ids": [5, 6, 7]}, {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]}])
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, 7] + [-100] * 5, [-100, -100, 3, 4, 5] + [-100] * 3]
    left = sa.PadCollator(padding_side="left")([[1, 2], [3, 4, 5]])
    assert left["input_ids"].tolist() == [[0, 1, 2], [3, 4, 5]] and left["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="more than max_length=2"):
        sa.PadCollator(max_length=2)([[1, 2, 3]])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_lm_task_matches_the_models_own_loss(name):
    model = tiny_hf(name).float()  # the transformers loss computes in float32
    batch = sa.PadCollator()(sequences(4, seed=1))
    counted = int((batch["attention_mask"][:, 1:] == 1).sum())
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    hf = model(**batch, labels=labels).loss * counted  # HF: mean next-token loss over labels != -100
    assert torch.allclose(LM.train_loss(model, batch), hf, rtol=1e-5)
    assert torch.allclose(LM.measurement(model, batch), -hf, rtol=1e-5)
    model = model.double()
    hf = -LM.measurement(model, batch)
    per_token = LM.token_losses(model, batch)
    assert per_token.shape == (4, batch["input_ids"].shape[1] - 1) and torch.allclose(per_token.sum(), hf, atol=1e-10)
    # the last k counted targets only
    last2 = sa.CausalLMTask(last_tokens=2).measurement(model, batch)
    lengths = batch["attention_mask"].sum(1)
    manual = sum(per_token[i, int(lengths[i]) - 3 : int(lengths[i]) - 1].sum() for i in range(4))
    assert torch.allclose(last2, -manual, atol=1e-10)


def test_causal_lm_task_forms_and_true_fisher():
    model = tiny_hf("llama")
    data = sequences(3, seed=2)
    padded = sa.PadCollator()(data)
    tuple_loss = sum(LM.train_loss(model, (ex["input_ids"][None],)) for ex in data)
    assert torch.allclose(LM.train_loss(model, padded), tuple_loss, atol=1e-10)  # dict+padding == unpadded tensors
    prompt = padded["input_ids"].clone().masked_fill(padded["attention_mask"] == 0, -100)
    prompt[:, :3] = -100
    masked = {**padded, "labels": prompt}
    assert LM.train_loss(model, masked) < LM.train_loss(model, padded)  # a response-only loss counts fewer tokens
    torch.manual_seed(0)
    a = LM.train_loss(model, padded, sample=True)
    torch.manual_seed(0)
    b = LM.train_loss(model, sa.PadCollator(max_length=40)(data), sample=True)
    assert torch.allclose(a, b, atol=1e-10)  # labels drawn at counted positions only: padding changes nothing
    with pytest.raises(ValueError, match=r"tokens \[B, T\] with T >= 2"):
        LM.train_loss(model, {"input_ids": torch.tensor([[5]])})


def test_sequence_classification_and_loss_task():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    data = [{**ex, "labels": torch.tensor(i % 3)} for i, ex in enumerate(sequences(6, seed=3))]
    batch = sa.PadCollator()(data)
    task = sa.SequenceClassificationTask()
    assert torch.allclose(task.train_loss(model, batch), model(**batch).loss * 6, atol=1e-10)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(task.measurement(model, batch), sa.task.margin(logits, batch["labels"]).sum(), atol=1e-10)
    feat = sa.Featurizer(model, task, batch_size=4, progress=False, collate_fn=sa.PadCollator(), engine="hooks")
    rows = feat.train_rows(data)
    ref = autograd_rows(model, task, [sa.PadCollator()([ex]) for ex in data])
    assert torch.allclose(rows, ref, atol=1e-10)  # padded batches == each example alone, through the mask
    with pytest.raises(ValueError, match=r"labels out of range: found \[0, 7\] for 3 classes"):
        task.train_loss(model, {**batch, "labels": torch.tensor([0, 1, 2, 7, 0, 1])})
    lt = sa.LossTask(lambda out, b: F.cross_entropy(out.logits, b["labels"], reduction="sum"), name="ce")
    assert torch.allclose(lt.train_loss(model, batch), task.train_loss(model, batch), atol=1e-12)
    with pytest.raises(ValueError, match="fisher='empirical'"):
        lt.train_loss(model, batch, sample=True)
    assert lt.describe() == "LossTask(ce)"


def test_logits_of_outputs():
    t = torch.randn(2, 3)
    assert logits_of(t) is t and logits_of({"logits": t}) is t and logits_of((t, None)) is t
    with pytest.raises(TypeError, match="cannot find logits"):
        logits_of("nope")


# ---------------------------------------------------------------------------- 2. selection
def test_selection_by_kind_pattern_and_blocks():
    gpt = tiny_hf("gpt2")
    linear = sa.select_modules(gpt, "linear").names
    assert linear and all(n.split(".")[-1] in ("c_attn", "c_proj", "c_fc") for n in linear) and len(linear) == 8
    mlp = sa.select_modules(gpt, ["*.mlp.*"]).names
    assert mlp == ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj")
    assert sa.select_modules(gpt, "norm").names[-1] == "transformer.ln_f"
    assert sa.select_modules(gpt, "embedding").names == ("transformer.wte", "transformer.wpe")
    llama = tiny_hf("llama")
    last = sa.select_modules(llama, sa.last_blocks(1)).names
    assert last and all(n.startswith("model.layers.1.") for n in last) and len(last) == 9
    assert sa.select_modules(llama, sa.last_blocks(2, "*.mlp.*")).names == tuple(
        f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj"))
    both = sa.select_modules(llama, ["model.embed_tokens", "*.mlp.down_proj"]).names
    assert both == ("model.embed_tokens", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    with pytest.raises(ValueError, match=r"'\*\.ffn\.\*' matches no module"):
        sa.select_modules(llama, "*.ffn.*")
    with pytest.raises(ValueError, match="unknown module name"):
        sa.select_modules(llama, ["model.nope"])


def test_last_n_on_dict_inputs_and_lora():
    llama = tiny_hf("llama")
    data = sequences(4, seed=4)
    feat = sa.Featurizer(llama, LM, modules=2, batch_size=2, progress=False, collate_fn=sa.PadCollator())
    feat.train_rows(data)  # traced on a dict batch: the last two modules in forward order
    assert feat.selection().names == ("model.norm", "lm_head")
    model = peft.get_peft_model(tiny_hf("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).double()
    sel = sa.select_modules(model, "lora")
    assert len(sel.names) == 8 and all(".lora_A." in n or ".lora_B." in n for n in sel.names)
    assert sel.total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "total" in sel.summary()


# ---------------------------------------------------------------------------- 3. per-token
@pytest.mark.parametrize("scorer_kind", ["sketched", "ekfac"])
def test_per_token_scores_sum_to_sequence_and_equal_leave_token_out(scorer_kind):
    model = tiny_hf("gpt2")
    train, queries = sequences(12, seed=5), sequences(3, seed=6)
    collate = sa.PadCollator()
    projector = sa.SJLTProjector(256, seed=0) if scorer_kind == "sketched" else "identity"
    feat = sa.Featurizer(model, LM, projector=projector, batch_size=5, progress=False, collate_fn=collate)
    store = feat.featurize(train)
    if scorer_kind == "sketched":
        scorer, q = sa.SketchedInfluence(damping=1e-3).fit(store), feat.query_rows(queries)
    else:
        factors = sa.fit_factors(model, LM, train, kind="ekfac", fisher="empirical", batch_size=6, progress=False, collate_fn=collate)
        scorer, q = sa.EKFACScorer(factors, feat).fit(store), queries
    full = scorer.score(q)
    picks = [0, 4, 7]
    tok = sa.per_token_scores(scorer, feat, q, train, picks)
    assert tok.scores.shape[:2] == (3, 3)
    assert torch.allclose(tok.totals, full[:, picks], atol=1e-8 * float(full.abs().max()), rtol=1e-6)
    for j, i in enumerate(picks):
        n = len(train[i]["input_ids"])
        assert (tok.scores[:, j, 0] == 0).all() and (tok.scores[:, j, n:] == 0).all()  # nothing predicted there
        t = 3  # leave token 3 out of the loss: the score drops by exactly its part
        labels = train[i]["input_ids"].clone()
        labels[t] = -100
        row = feat.train_rows([{"input_ids": train[i]["input_ids"], "labels": labels}])
        assert torch.allclose(scorer.score_rows(q, row)[:, 0], full[:, i] - tok.scores[:, j, t], atol=1e-8 * float(full.abs().max()))


# ---------------------------------------------------------------------------- 4. optimizer-aware
def _adam_trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-6)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, x, y


def test_adam_preconditioned_rows_equal_dense_formula():
    from dense_reference import ce_loss, margin_fn, per_example_grads

    model, opt, x, y = _adam_trained()
    pre = sa.AdamPreconditioner.from_optimizer(opt, model)
    again = sa.AdamPreconditioner.from_state_dict(opt.state_dict(), model)
    assert pre.spec() == again.spec() and pre.eps == 1e-6
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    scale = 1.0 / (v.sqrt() + 1e-6)
    G, Q = per_example_grads(model, ce_loss, x, y), per_example_grads(model, margin_fn, x[:4], y[:4])
    for engine in ("hooks", "vmap"):
        feat = sa.Featurizer(model, sa.ClassificationTask(), projector=sa.GaussianProjector(7, seed=2), preconditioner=pre,
                             progress=False, engine=engine)
        P = feat.projector.matrix(list(feat.selection().dims))
        assert torch.allclose(feat.train_rows((x, y)), (G * scale) @ P.T, atol=1e-10)  # LESS: train side
        assert torch.allclose(feat.query_rows((x[:4], y[:4])), Q @ P.T, atol=1e-10)   # plain target gradients
    track = sa.Featurizer(model, sa.ClassificationTask(), projector=sa.GaussianProjector(7, seed=2),
                          preconditioner=sa.AdamPreconditioner.from_optimizer(opt, model, queries=True), progress=False)
    assert torch.allclose(track.query_rows((x[:4], y[:4])), (Q * scale) @ P.T, atol=1e-10)  # TrackStar: both sides
    with pytest.raises(ValueError, match="factorized"):
        sa.Featurizer(model, sa.ClassificationTask(), projector="factorized", m=4, preconditioner=pre)


def test_less_selection_equals_dense_cosine_max():
    from dense_reference import ce_loss, margin_fn, per_example_grads

    model, opt, x, y = _adam_trained()
    pre = sa.AdamPreconditioner.from_optimizer(opt, model)
    feat = sa.Featurizer(model, sa.ClassificationTask(), projector=sa.GaussianProjector(16, seed=3), preconditioner=pre, progress=False)
    store = feat.featurize((x, y))
    less = sa.TracIn(feat, variant="cos").fit(store)
    targets = (x[:5], y[:5])
    chosen = sa.select_training_data(less.score(targets), less.train_indices, fraction=0.1, aggregate="max")
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    P = feat.projector.matrix(list(feat.selection().dims))
    gt = F.normalize(((per_example_grads(model, ce_loss, x, y) / (v.sqrt() + 1e-6)) @ P.T), dim=1)  # the optimizer's eps
    gq = F.normalize(per_example_grads(model, margin_fn, *targets) @ P.T, dim=1)
    cos = -(gq @ gt.T)  # TracIn's sign: −∇f·∇ℓ (f the margin)
    best = torch.argsort(cos.max(dim=0).values, descending=True)[:4].numpy()
    assert list(chosen.indices) == list(best) and len(chosen.indices) == 4
    assert torch.allclose(chosen.scores, cos.max(dim=0).values[best], atol=1e-10)
    mean = sa.aggregate_scores(less.score(targets), "mean")
    assert torch.allclose(mean, cos.mean(dim=0), atol=1e-10)
    other = sa.Featurizer(model, sa.ClassificationTask(), projector=sa.GaussianProjector(16, seed=3), progress=False)
    with pytest.raises(StoreMismatchError, match="preconditioner"):
        sa.TracIn(other, variant="cos").fit(store)


def test_core_import_needs_no_transformers():
    import subprocess
    import sys

    code = "import sys, sketchattr; print(any(m.split('.')[0] in ('transformers', 'peft') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
