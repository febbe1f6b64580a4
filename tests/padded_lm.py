"""Tiny Hugging Face models (random init, float64) and padded token batches for the hook-engine tests."""
import os

import torch
import torch.nn.functional as F

from sketchattr.task import Task, sample_categorical

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class PaddedLMTask(Task):
    """Next-token loss over real positions (labels -100 elsewhere) of dict batches; the
    attention mask is the Task mask; true-Fisher labels are drawn for real positions only."""

    def _loss(self, model, batch, sample=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        if sample:
            real = labels != -100
            labels = labels.clone()
            labels[real] = sample_categorical(logits[real])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")

    def train_loss(self, model, batch, sample=False):
        return self._loss(model, batch, sample)

    def measurement(self, model, batch):
        return -self._loss(model, batch)

    def mask(self, batch):
        return batch["attention_mask"]


def padded_tokens(n, length, vocab=64, seed=0, min_len=4, max_len=14):
    """n examples right-padded (id 0) to ``length``: list of dicts of input_ids, attention_mask, labels."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=g)
    toks = torch.randint(3, vocab, (n, max_len), generator=g)
    out = []
    for i, k in enumerate(lens.tolist()):
        ids = torch.zeros(length, dtype=torch.long)
        ids[:k] = toks[i, :k]
        mask = (torch.arange(length) < k).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def unpadded(example):
    """The example cut to its real tokens, as a batch of one."""
    k = int(example["attention_mask"].sum())
    return {key: v[:k][None] for key, v in example.items()}


def tiny_hf(name, seed=0):
    """A tiny random-init HF model in float64, eval mode: gpt2 | llama | bert."""
    import transformers as tf

    torch.manual_seed(seed)
    if name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    elif name == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    elif name == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, max_position_embeddings=64))
    else:
        raise ValueError(name)
    return model.double().eval()


def autograd_rows(model, task, batches, kind="train", names=None):
    """[n, d] per-example gradients (all trainable parameters in named_parameters order, or the
    parameters ``names`` in that order) by a loop."""
    named = dict(model.named_parameters())
    params = [p for p in model.parameters() if p.requires_grad] if names is None else [named[n] for n in names]
    rows = []
    for b in batches:
        loss = task.train_loss(model, b) if kind == "train" else task.measurement(model, b)
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)]))
    return torch.stack(rows)
