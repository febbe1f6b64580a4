"""LoRA on a GPT-2- or Llama-style language model: store, sketched influence, EKFAC, per-token
scores and LESS-style data selection, with real padding and the default attention.

The corpus is generated so the example runs anywhere without downloads
(:func:`sketchattr.bench.data.markov.markov_text`): four "languages", each a sparse bigram chain over a
64-token vocabulary (every token has three likely successors, different per language), sequences
of 8–24 tokens padded in batches by ``sa.PadCollator``. A tiny random-init
model (``--arch gpt2 | llama``, built from a config) gets LoRA adapters (rank 8) trained with AdamW;
attribution runs through the adapters only (``modules="lora"``).

    python examples/lora_lm/attribute.py [--arch llama] [--train 400] [--epochs 6]

It prints, for a few queries of language 0, the top-5 proponents (with their languages) from
regularized sketched influence on an SJLT store and from EKFAC on the exact adapter gradients, the
target tokens that carry the top proponent's influence, and which 5% of the training set a
LESS-style selection (Adam-preconditioned train gradients, cosine, max over a target set of
language 0) picks. ``run(...)`` returns the figures the tests check.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import numpy as np
import torch

import sketchattr as sa
from sketchattr.bench.data.markov import markov_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 64


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-init model with rank-8 LoRA adapters on its attention projections."""
    import peft
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "gpt2":
        base = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                                bos_token_id=1, eos_token_id=2))
        targets = ["c_attn"]
    elif arch == "llama":
        base = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
        targets = ["q_proj", "v_proj"]
    else:
        raise ValueError(f"arch must be gpt2 or llama, got {arch!r}")
    return peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))


def train(model: torch.nn.Module, data: list[dict], epochs: int, seed: int = 0) -> torch.optim.Optimizer:
    """AdamW on the adapters (the base stays frozen); returns the optimizer (its moments feed LESS)."""
    task, collate = sa.CausalLMTask(), sa.PadCollator()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, collate_fn=collate, generator=g):
            opt.zero_grad()
            (task.train_loss(model, batch) / batch["attention_mask"].sum()).backward()
            opt.step()
    model.eval()
    return opt


@dataclass
class Result:
    sketched_same_language: float   # share of top-5 proponents in the query's language
    ekfac_same_language: float
    less_same_language: float       # share of the LESS selection in the target language
    token_parts_sum_error: float    # |Σ_t per-token − sequence score| / |sequence score|
    n_selected: int


def run(arch: str = "llama", n_train: int = 400, n_query: int = 6, epochs: int = 6, m: int = 2048,
        verbose: bool = True) -> Result:
    text = markov_text(n_train, n_query + 8, vocab=VOCAB, lengths=(8, 24), query_chains=[0])
    train_set, train_lang = text.train, text.train_chain
    queries, targets = text.queries[:n_query], text.queries[n_query:]  # all of language 0
    model = build(arch)
    opt = train(model, train_set, epochs)
    task, collate = sa.CausalLMTask(), sa.PadCollator()
    say = print if verbose else (lambda *a, **k: None)

    # regularized sketched influence on an SJLT store of the adapters' gradients
    feat = sa.Featurizer(model, task, modules="lora", projector="sjlt", m=m, batch_size=32, collate_fn=collate, progress=verbose)
    say(feat.selection().summary())
    store = feat.featurize(train_set)
    scorer = sa.SketchedInfluence(damping="auto").fit(store)
    q = feat.query_rows(queries)
    top = scorer.top_k(q, k=5)
    sketched = float(np.mean(train_lang[top.proponents] == 0))

    # EKFAC on the exact adapter gradients
    exact = sa.Featurizer(model, task, modules="lora", projector="identity", batch_size=32, collate_fn=collate, progress=False)
    factors = sa.fit_factors(model, task, train_set, kind="ekfac", modules="lora", collate_fn=collate, progress=False)
    ekfac = sa.EKFACScorer(factors, exact).fit(exact.featurize(train_set))
    etop = ekfac.top_k(queries, k=5)
    ekfac_share = float(np.mean(train_lang[etop.proponents] == 0))
    for i in range(min(3, n_query)):
        say(f"query {i} (language 0): sketched top-5 {top.proponents[i].tolist()} languages {train_lang[top.proponents[i]].tolist()}; "
            f"EKFAC {etop.proponents[i].tolist()} languages {train_lang[etop.proponents[i]].tolist()}")

    # which target tokens of the top proponent carry its influence on query 0
    best = int(top.proponents[0, 0])
    tokens = sa.per_token_scores(scorer, feat, q[:1], train_set, [best])
    err = float((tokens.totals[0, 0] - scorer.score(q[:1])[0, list(store.indices).index(best)]).abs()
                / tokens.totals[0, 0].abs())
    say(f"train sequence {best}: tokens carrying its score for query 0 (position, part): {tokens.top_tokens(0, 0, k=3)}")

    # LESS-style selection: Adam-preconditioned train gradients, cosine, max over the target set
    pre = sa.AdamPreconditioner.from_optimizer(opt, model)
    less_feat = sa.Featurizer(model, task, modules="lora", projector="sjlt", m=m, batch_size=32, collate_fn=collate,
                              preconditioner=pre, progress=False)
    less = sa.TracIn(less_feat, variant="cos").fit(less_feat.featurize(train_set))
    chosen = sa.select_training_data(less.score(targets), less.train_indices, fraction=0.05, aggregate="max")
    less_share = float(np.mean(train_lang[chosen.indices] == 0))
    say(f"LESS-style top 5% ({len(chosen.indices)} sequences): {less_share:.0%} from the target language "
        f"(25% by chance)")
    return Result(sketched, ekfac_share, less_share, err, len(chosen.indices))


def main(argv: list[str] | None = None) -> Result:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama", choices=["gpt2", "llama"])
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--m", type=int, default=2048)
    args = ap.parse_args(argv)
    res = run(args.arch, args.train, args.queries, args.epochs, args.m)
    print(f"top-5 proponents in the query's language: sketched influence {res.sketched_same_language:.0%}, "
          f"EKFAC {res.ekfac_same_language:.0%} (25% by chance)")
    return res


if __name__ == "__main__":
    main()
