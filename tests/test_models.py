"""Experiment models: construction, shapes, seeds, per-example gradients, one-epoch training."""
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from sketchattr import ClassificationTask, Featurizer
from sketchattr.bench.data import DatasetSplit, load_dataset
from sketchattr.bench.models import available_models, make_mlp, make_model, model_name_of
from sketchattr.bench.recipes import train_digits_mlp
from sketchattr.task import CausalLMTask
from sketchattr.bench.train import default_recipe, evaluate_model, train_model

SMALL = {"resnet9": {"width": 2}, "musictransformer": {"d_model": 16, "n_heads": 4}}


def image_split(n: int = 64, shape=(3, 8, 8), classes: int = 3, seed: int = 0) -> DatasetSplit:
    """Learnable synthetic images: the class shifts one channel's mean."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.5 * torch.randn(n, *shape, generator=g)
    x[torch.arange(n), y % shape[0]] += 1.0
    return DatasetSplit("synthetic", TensorDataset(x, y), TensorDataset(x[:8], y[:8]), classes, tuple(shape))


def token_split(n: int = 32, t: int = 8, vocab: int = 11, seed: int = 0) -> DatasetSplit:
    """Learnable synthetic sequences: counting mod vocab from a random start."""
    g = torch.Generator().manual_seed(seed)
    tok = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(t)) % vocab
    return DatasetSplit("synthetic-lm", TensorDataset(tok), TensorDataset(tok[:4]), None, (t,), vocab_size=vocab)


def split_for(name: str) -> DatasetSplit:
    return token_split() if name == "musictransformer" else image_split()


def task_for(name: str):
    return CausalLMTask() if name == "musictransformer" else ClassificationTask()


def test_available_models_and_unknown_names():
    assert available_models() == ["lr", "mlp", "resnet9", "musictransformer", "gpt"]
    with pytest.raises(ValueError, match="available.*resnet9"):
        make_model("vgg", image_split())
    with pytest.raises(ValueError, match="available.*cifar2"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="num_classes=None"):
        make_model("mlp", token_split())


@pytest.mark.parametrize("name", ["lr", "mlp", "resnet9", "musictransformer"])
def test_forward_shape_and_seed_determinism(name):
    split = split_for(name)
    a = make_model(name, split, seed=3, **SMALL.get(name, {})).eval()
    b = make_model(name, split, seed=3, **SMALL.get(name, {})).eval()
    c = make_model(name, split, seed=4, **SMALL.get(name, {})).eval()
    assert model_name_of(a) == name
    x = split.train.tensors[0][:5]
    out = a(x)
    if name == "musictransformer":
        assert out.shape == (5, split.input_shape[0], split.vocab_size)
    else:
        assert out.shape == (5, split.num_classes)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))


def test_transformer_is_causal():
    split = token_split()
    model = make_model("musictransformer", split, **SMALL["musictransformer"]).eval()
    x = split.train.tensors[0][:2]
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % split.vocab_size
    assert torch.allclose(model(x)[:, :-1], model(y)[:, :-1], atol=1e-6)


def test_digits_mlp_is_the_bench_model():
    split = load_dataset("digits")
    model = make_model("mlp", split, seed=2)
    assert sum(p.numel() for p in model.parameters()) == 9610
    ref = make_mlp(seed=2)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), ref.state_dict().values()))
    assert default_recipe("digits", "mlp").epochs == 60 and default_recipe("digits", "mlp").lr == 0.05
    subset = np.arange(0, 1000, 5)
    trained = train_model(make_model("mlp", split, seed=1), split, seed=1, subset=subset)
    bench = train_digits_mlp(subset=subset, seed=1)
    assert not trained.training
    assert all(torch.equal(p, q) for p, q in zip(trained.state_dict().values(), bench.state_dict().values()))


def _randomize_bn_stats(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype))


@pytest.mark.parametrize("name", ["lr", "mlp", "resnet9", "musictransformer"])
def test_per_example_gradients_equal_autograd_loop(name):
    split = split_for(name)
    model = make_model(name, split, seed=0, **SMALL.get(name, {})).double().eval()
    _randomize_bn_stats(model)
    task = task_for(name)
    tensors = tuple(t[:4].double() if t.is_floating_point() else t[:4] for t in split.train.tensors)
    rows = Featurizer(model, task, projector="identity", batch_size=3, progress=False).train_rows(TensorDataset(*tensors))
    params = list(model.parameters())
    ref = []
    for i in range(4):
        loss = task.train_loss(model, tuple(t[i : i + 1] for t in tensors))
        ref.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    ref = torch.stack(ref)
    assert rows.shape == (4, sum(p.numel() for p in params)) and rows.dtype == torch.float64
    assert torch.allclose(rows, ref, atol=1e-10, rtol=1e-8)
    q = Featurizer(model, task, projector="identity", progress=False).query_rows(TensorDataset(*tensors))
    assert q.shape == rows.shape and torch.isfinite(q).all()


@pytest.mark.parametrize("name", ["lr", "mlp", "resnet9", "musictransformer"])
def test_one_epoch_reduces_loss(name):
    split = split_for(name)
    model = make_model(name, split, seed=0, **SMALL.get(name, {}))
    before = evaluate_model(model, split, "train")["loss"]
    lr = 3e-3 if name == "musictransformer" else 0.05
    trained = train_model(model, split, epochs=1, lr=lr, batch_size=8, seed=0)
    assert trained is model and not model.training
    after = evaluate_model(model, split, "train")["loss"]
    assert after < before


def test_training_is_deterministic_and_subset_is_used():
    split = token_split()
    runs = [train_model(make_model("musictransformer", split, **SMALL["musictransformer"]), split,
                        epochs=1, batch_size=8, seed=5, subset=sub)
            for sub in (np.arange(16), np.arange(16), np.arange(16, 32))]
    sd = [r.state_dict() for r in runs]
    assert all(torch.equal(sd[0][k], sd[1][k]) for k in sd[0])
    assert not all(torch.equal(sd[0][k], sd[2][k]) for k in sd[0])
    mask = np.zeros(32, dtype=bool)
    mask[:16] = True
    masked = train_model(make_model("musictransformer", split, **SMALL["musictransformer"]), split,
                         epochs=1, batch_size=8, seed=5, subset=mask).state_dict()
    assert all(torch.equal(sd[0][k], masked[k]) for k in sd[0])


def test_causal_lm_task_conventions():
    split = token_split()
    model = make_model("musictransformer", split, **SMALL["musictransformer"]).double().eval()
    tok = split.train.tensors[0][:3]
    task = CausalLMTask()
    logits = model(tok)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, split.vocab_size), tok[:, 1:].reshape(-1), reduction="sum")
    assert torch.allclose(task.train_loss(model, (tok,)), ref) and torch.allclose(task.train_loss(model, tok), ref)
    assert torch.allclose(task.measurement(model, (tok,)), -ref)
    torch.manual_seed(0)
    s1 = task.train_loss(model, tok, sample=True)
    torch.manual_seed(0)
    assert torch.equal(s1, task.train_loss(model, tok, sample=True)) and not torch.allclose(s1, ref)
    feat = Featurizer(model, task, projector="gaussian", m=16, progress=False)
    rows = torch.cat([r for _, r in feat.iter_rows(split.train, np.arange(4), sample=True)])
    assert rows.shape == (4, 16) and torch.isfinite(rows).all()
    with pytest.raises(ValueError, match="T >= 2"):
        task.train_loss(model, tok[:, :1])


def test_resnet9_on_mnist_shaped_inputs():
    split = image_split(n=8, shape=(1, 28, 28), classes=10)
    model = make_model("resnet9", split, width=2).eval()
    assert model(split.train.tensors[0]).shape == (8, 10)
    assert sum(p.numel() for p in make_model("resnet9", image_split(n=8, shape=(3, 32, 32), classes=2)).parameters()) < 500_000


def test_train_lm_keeps_a_checkpoint_after_every_epoch():
    """train_lm(on_epoch_end=...): one call per epoch, in order; the last copy is the returned model, and
    an epoch-1 copy equals a 1-epoch run (the same seed and shuffling)."""
    import copy

    pytest.importorskip("transformers")
    from sketchattr.bench.data.markov import markov_text
    from sketchattr.bench.recipes import tiny_gpt2, train_lm

    text = markov_text(n_train=32, n_query=2)
    kept = []
    model, _ = train_lm(tiny_gpt2(vocab=text.vocab, seed=0), text.train, epochs=2,
                        on_epoch_end=lambda epoch, m: kept.append((epoch, copy.deepcopy(m))))
    assert [e for e, _ in kept] == [1, 2]
    state = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    assert torch.equal(state(kept[-1][1]), state(model))
    one, _ = train_lm(tiny_gpt2(vocab=text.vocab, seed=0), text.train, epochs=1)
    assert torch.equal(state(kept[0][1]), state(one)) and not torch.equal(state(one), state(model))
