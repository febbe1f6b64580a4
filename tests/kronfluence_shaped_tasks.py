"""Tasks and models in the shape of Kronfluence 1.0's own test tasks, written here for sketchattr.

Kronfluence's ``tests/testable_tasks`` are what its users write: ``Task`` classes whose methods
take ``(batch, model)`` with the ``nn.Module`` itself and read it (``list(model.parameters())[1].dtype``
to cast inputs, ``checkpoint_sequential(model, ...)``), a loss-like measurement, an attention mask
from ``get_attention_mask`` and, for multiple choice, ``post_process_per_sample_gradient``.
The classes below have those shapes (duck-typed: kronfluence is not imported) so that
``sa.KronfluenceTask`` can be tested against code that does what Kronfluence's users' code does;
``benchmarks/kronfluence_testable_tasks.py`` runs the same set-ups through Kronfluence itself.

Each set-up is ``SETUPS[name]() -> Setup`` (float64 model in eval mode, train and query
examples, the task object, the dense-reference batches of one example each).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------- regression
class RegressionTask:
    """Squared error summed over the batch; casts inputs to the model's dtype by reading it."""

    def _outputs(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        inputs, targets = batch
        dtype = list(model.parameters())[1].dtype  # reads the module, as Kronfluence's tasks do
        outputs = self._outputs(model, inputs.to(dtype))
        if sample:
            with torch.no_grad():
                targets = torch.normal(outputs.detach(), std=math.sqrt(0.5))
        return F.mse_loss(outputs, targets.to(dtype), reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model)


class CheckpointedRegressionTask(RegressionTask):
    """The same loss through ``checkpoint_sequential`` (non-reentrant): the module must be an nn.Sequential."""

    def _outputs(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return checkpoint_sequential(model, 2, inputs, use_reentrant=False)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


class SharedLayerMLP(nn.Module):
    """``shared`` runs three times in one forward (its gradient sums the three uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(10, 16)
        self.shared = nn.Linear(16, 16)
        self.middle = nn.Linear(16, 16)
        self.last = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.first(x))))))
        return self.last(torch.relu(self.shared(torch.relu(self.middle(x)))))


def regression_data(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """float32 inputs [10] and integer-valued targets [1], as users' files give them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = torch.randint(-5, 5, (n, 1), generator=g).float()
    return list(zip(x, y))


# ---------------------------------------------------------------------------- image classification
class ClassificationTask:
    """Cross-entropy; the measurement is Kronfluence's loss-like −margin."""

    def _logits(self, batch: Any, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = batch
        return model(inputs.to(list(model.parameters())[1].dtype)), labels

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits, labels = self._logits(batch, model)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        logits, labels = self._logits(batch, model)
        rows = torch.arange(len(labels))
        correct = logits[rows, labels]
        others = logits.clone()
        others[rows, labels] = -torch.inf
        return -(correct - others.logsumexp(dim=-1)).sum()


def conv_bn_inplace(seed: int = 0) -> nn.Module:
    """Conv2d + in-place ReLU + BatchNorm2d (eval mode, non-trivial running statistics) + Linear, on 3×8×8 images."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4),
        nn.Conv2d(4, 8, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(8),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )
    for bn in (model[2], model[5]):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        nn.init.normal_(bn.weight, 1.0, 0.2)
        nn.init.normal_(bn.bias, 0.0, 0.2)
    return model


def image_data(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return list(zip(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)))


# ---------------------------------------------------------------------------- language models
class LanguageModelingTask:
    """Summed next-token loss of dict batches (labels −100 on padding); tracks named modules."""

    def __init__(self, modules: list[str] | None = None) -> None:
        self.modules = modules

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        if sample:
            with torch.no_grad():
                real = labels != -100
                labels = labels.clone()
                labels[real] = torch.multinomial(torch.softmax(logits[real].detach(), dim=-1), 1).flatten()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self) -> list[str] | None:
        return self.modules

    def get_attention_mask(self, batch: Any) -> torch.Tensor:
        return batch["attention_mask"]


class TrainingModeLMTask(LanguageModelingTask):
    """Runs the model in training mode (every dropout is 0) so that Hugging Face's gradient
    checkpointing, inert in eval mode, really recomputes each block during the backward."""

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        model.train()
        return super().compute_train_loss(batch, model, sample)


def linear_gpt2(seed: int = 0) -> nn.Module:
    """Tiny GPT-2 (no dropout) with transformers' Conv1D replaced by nn.Linear, as Kronfluence's
    own GPT-2 task does (Kronfluence tracks nn.Linear and nn.Conv2d only)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = tf.GPT2LMHeadModel(cfg)
    _conv1d_to_linear(model)
    return model


@torch.no_grad()
def _conv1d_to_linear(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child).__name__ == "Conv1D":
            lin = nn.Linear(child.weight.shape[0], child.weight.shape[1])
            lin.weight.copy_(child.weight.T)
            lin.bias.copy_(child.bias)
            setattr(module, name, lin)
        else:
            _conv1d_to_linear(child)


def gpt2_blocks(n_layer: int = 2) -> list[str]:
    return [f"transformer.h.{i}.{m}" for i in range(n_layer) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def token_data(n: int, seed: int, length: int, pad: int = 0, lo: int = 4, vocab: int = 64) -> list[dict[str, torch.Tensor]]:
    """Right-padded sequences of lengths lo..length (pad id ``pad``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, length + 1, (1,), generator=g))
        ids = torch.full((length,), pad, dtype=torch.long)
        ids[:k] = torch.randint(3, vocab, (k,), generator=g)
        mask = (torch.arange(length) < k).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


# ---------------------------------------------------------------------------- text classification
class TextClassificationTask:
    """Sequence classification of padded dict batches (``labels`` [B]); loss-like −margin measurement."""

    def _logits(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits, labels = self._logits(batch, model), batch["labels"]
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        logits, labels = self._logits(batch, model), batch["labels"]
        rows = torch.arange(len(labels))
        others = logits.clone()
        others[rows, labels] = -torch.inf
        return -(logits[rows, labels] - others.logsumexp(dim=-1)).sum()

    def get_attention_mask(self, batch: Any) -> torch.Tensor:
        return batch["attention_mask"]


class MultipleChoiceTask(TextClassificationTask):
    """Multiple choice: ``input_ids``/``attention_mask`` [B, C, T] (the model runs B·C sequences),
    logits [B, C]; Kronfluence sums each example's C per-sample gradients in
    ``post_process_per_sample_gradient``."""

    enable_post_process_per_sample_gradient = True

    def __init__(self, choices: int) -> None:
        self.choices = choices

    def post_process_per_sample_gradient(self, module_name: str, gradient: torch.Tensor) -> torch.Tensor:
        del module_name
        return gradient.reshape(gradient.shape[0] // self.choices, self.choices, *gradient.shape[1:]).sum(dim=1)


def tiny_bert_classifier(seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                        max_position_embeddings=64, num_labels=3)
    return tf.BertForSequenceClassification(cfg)


def tiny_roberta_multiple_choice(seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                           max_position_embeddings=64, pad_token_id=1)
    return tf.RobertaForMultipleChoice(cfg)


def labelled(examples: list[dict], classes: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{**ex, "labels": torch.randint(0, classes, (), generator=g)} for ex in examples]


def choice_data(n: int, seed: int, choices: int = 3, length: int = 12, pad: int = 1) -> list[dict[str, torch.Tensor]]:
    """n examples of ``choices`` right-padded sequences each ([C, T]) and a label in range(C)."""
    out = []
    for i in range(n):
        seqs = token_data(choices, seed * 1000 + i, length, pad=pad)
        out.append({"input_ids": torch.stack([s["input_ids"] for s in seqs]),
                    "attention_mask": torch.stack([s["attention_mask"] for s in seqs])})
    return labelled(out, choices, seed)


# ---------------------------------------------------------------------------- the set-ups
@dataclass
class Setup:
    """One Kronfluence-shaped attribution problem: model (float64, eval), task, data, and how to
    cut an example to the batch of one its dense reference uses."""

    model: nn.Module
    task: Any
    train: list
    queries: list
    alone: Callable[[Any], Any]
    default_modules: list[str] | None = None
    """The modules KronfluenceTask must pick when the task names none (Kronfluence's leaf Linear/Conv2d)."""


def _tuple_alone(example: tuple) -> tuple:
    return tuple(t[None] for t in example)


def _tokens_alone(example: dict) -> dict:
    """The example cut to its real tokens (right padding) as a batch of one."""
    k = int(example["attention_mask"].sum())
    return {key: (v[:k] if v.dim() else v)[None] for key, v in example.items()}


def _choices_alone(example: dict) -> dict:
    return {key: v[None] for key, v in example.items()}


def shared_layer_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SharedLayerMLP()


def _regression(model_fn: Callable[[], nn.Module], task: Any) -> Setup:
    return Setup(model_fn().double().eval(), task, regression_data(12, 1), regression_data(3, 2), _tuple_alone)


SETUPS: dict[str, Callable[[], Setup]] = {
    "regression_mlp": lambda: _regression(mlp, RegressionTask()),
    "shared_layer_mlp": lambda: _regression(shared_layer_mlp, RegressionTask()),
    "checkpoint_sequential": lambda: _regression(mlp, CheckpointedRegressionTask()),
    "conv_bn_inplace": lambda: Setup(conv_bn_inplace().double().eval(), ClassificationTask(), image_data(10, 1), image_data(3, 2),
                                     _tuple_alone, default_modules=["0", "3", "7"]),
    "gpt2_checkpointing": lambda: Setup(_checkpointed(linear_gpt2()), TrainingModeLMTask(gpt2_blocks()),
                                        token_data(8, 1, 16), token_data(3, 2, 16), _tokens_alone),
    "bert_padding": lambda: Setup(tiny_bert_classifier().double().eval(), TextClassificationTask(),
                                  labelled(token_data(8, 1, 20), 3, 1), labelled(token_data(3, 2, 20), 3, 2), _tokens_alone),
    "roberta_multiple_choice": lambda: Setup(tiny_roberta_multiple_choice().double().eval(), MultipleChoiceTask(3),
                                             choice_data(6, 1), choice_data(3, 2), _choices_alone),
}


def _checkpointed(model: nn.Module) -> nn.Module:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.double().eval()
