"""EKFAC with attention masks on padded batches: sketchattr against Kronfluence, padded to 32 and 64 tokens.

Tiny random-init Hugging Face models (float64) — Llama (Linear layers without biases), GPT-2
(transformers' Conv1D replaced by nn.Linear, as Kronfluence's own GPT-2 task does: it tracks
nn.Linear only; biases) and BERT (biases) — score right-padded token sequences (lengths 5–20, pad
id 0, labels −100 on padding; the next-token loss, for BERT too). Both libraries fit EKFAC on
the Linear layers of the blocks with the empirical Fisher (no label sampling, so the two fits see the same
gradients), Kronfluence with its ``Task.get_attention_mask`` and sketchattr with ``Task.mask``,
and both use the damping 0.1·mean(Λ) per module (Kronfluence: ``damping_factor=None``). Scores
are compared by Pearson correlation (all pairs) for each padding length, and each library
against itself across the two lengths. Controls: the same fits without the mask.

Sign: Kronfluence scores ``∇L_qᵀ M ∇L_i`` with the query loss as measurement; sketchattr's
measurement is the log-likelihood and its scores ``−∇f_qᵀ M ∇L_i``: the same numbers.

Kronfluence is not a dependency: install it in a side environment that sees this one's torch
(``--no-deps`` keeps torch pinned) and run this script there with our package on ``PYTHONPATH``,
from a temporary directory (Kronfluence writes its factors into the working directory):

    python -m venv --system-site-packages /tmp/kf
    /tmp/kf/bin/pip install --no-deps kronfluence==1.0.1 accelerate einops opt_einsum einconv
    cd $(mktemp -d) && PYTHONPATH=/path/to/repo /tmp/kf/bin/python /path/to/repo/benchmarks/kronfluence_padded_lm.py [--quick]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import sketchattr as sa
from sketchattr.task import Task

PAD = 0


MODELS = ("llama", "gpt2", "bert")
BLOCKS = {"llama": "model.layers.", "gpt2": "transformer.h.", "bert": "bert.encoder.layer."}


def build_model(name: str = "llama", seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    if name == "llama":
        cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(cfg)
    elif name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=128, n_embd=32, n_layer=2, n_head=4))
        _conv1d_to_linear(model)
    elif name == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, max_position_embeddings=128, pad_token_id=PAD))
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    return model.double().eval()


@torch.no_grad()
def _conv1d_to_linear(module: nn.Module) -> None:
    """transformers' Conv1D (weight [in, out]) -> nn.Linear with the same function."""
    for name, child in module.named_children():
        if type(child).__name__ == "Conv1D":
            lin = nn.Linear(child.weight.shape[0], child.weight.shape[1]).to(child.weight.dtype)
            lin.weight.copy_(child.weight.T)
            lin.bias.copy_(child.bias)
            setattr(module, name, lin)
        else:
            _conv1d_to_linear(child)


def sequences(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (int(torch.randint(5, 21, (1,), generator=g)),), generator=g) for _ in range(n)]


def pad_right(seqs: list[torch.Tensor], length: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for s in seqs:
        ids = torch.full((length,), PAD, dtype=torch.long)
        ids[: len(s)] = s
        mask = (torch.arange(length) < len(s)).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _nll(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


class OurTask(Task):
    """Summed next-token loss over real positions; measurement: the query's log-likelihood."""

    def __init__(self, modules: list[str], use_mask: bool = True) -> None:
        self.modules, self.use_mask = modules, use_mask

    def train_loss(self, model, batch, sample=False):
        return _nll(model, batch)

    def measurement(self, model, batch):
        return -_nll(model, batch)

    def mask(self, batch):
        return batch["attention_mask"] if self.use_mask else None


def ours(model: nn.Module, modules: list[str], train: list, query: list, use_mask: bool) -> torch.Tensor:
    task = OurTask(modules, use_mask)
    factors = sa.fit_factors(model, task, train, kind="ekfac", fisher="empirical", batch_size=len(train), progress=False)
    feat = sa.Featurizer(model, task, projector="identity", batch_size=16, progress=False)
    return sa.EKFACScorer(factors, feat, damping=None).fit(feat.featurize(train)).score(query)  # 0.1·mean(Λ), as Kronfluence


def kronfluence(model: nn.Module, modules: list[str], train: list, query: list, use_mask: bool, out: str) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask

    class KfTask(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            return _nll(model, batch)

        def compute_measurement(self, batch, model):
            return _nll(model, batch)

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"] if use_mask else None

    task = KfTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name="padded", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=out)
    f64 = torch.float64
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=f64,
                            gradient_covariance_dtype=f64, lambda_dtype=f64)
    analyzer.fit_all_factors(factors_name="f", dataset=train, per_device_batch_size=len(train), factor_args=fargs,
                             overwrite_output_dir=True)
    sargs = ScoreArguments(damping_factor=None, per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64)
    analyzer.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=query, train_dataset=train,
                                     per_device_query_batch_size=len(query), per_device_train_batch_size=16,
                                     score_args=sargs, overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("s")["all_modules"]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 train sequences, 4 queries")
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = parser.parse_args()
    n_train, n_query = (16, 4) if args.quick else (args.train, args.queries)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    seqs = sequences(n_train + n_query, seed=123)
    rows = []
    for name in tqdm(args.models, desc="models"):
        rows += compare(name, seqs, n_train)
    print("\n| model | comparison | Pearson | max rel. diff |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def compare(name: str, seqs: list[torch.Tensor], n_train: int) -> list[tuple[str, ...]]:
    """Both libraries on ``name`` at both paddings, with and without masks: the table's rows."""
    modules = [n for n, m in build_model(name).named_modules() if n.startswith(BLOCKS[name]) and isinstance(m, nn.Linear)]
    print(f"tiny {name}, {len(modules)} Linear modules, {n_train} train / {len(seqs) - n_train} query sequences of 5-20 tokens")
    scores: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for length in (32, 64):
            data = pad_right(seqs, length)
            train, query = data[:n_train], data[n_train:]
            for use_mask in (True, False):
                for lib in ("sketchattr", "kronfluence"):
                    t0 = time.perf_counter()
                    model = build_model(name)
                    if lib == "sketchattr":
                        s = ours(model, modules, train, query, use_mask)
                    else:
                        s = kronfluence(model, modules, train, query, use_mask, f"{tmp}/{length}{use_mask}")
                    scores[lib, length, use_mask] = s
                    print(f"  {lib:<12} padded to {length}, mask {'on ' if use_mask else 'off'}: {time.perf_counter() - t0:5.1f}s")
    rows = []
    for length in (32, 64):
        a, b = scores["sketchattr", length, True], scores["kronfluence", length, True]
        rows.append((name, f"sketchattr vs Kronfluence, masks, padded to {length}", f"{pearson(a, b):.9f}", f"{rel(b, a):.2e}"))
    for lib in ("sketchattr", "kronfluence"):
        a, b = scores[lib, 32, True], scores[lib, 64, True]
        rows.append((name, f"{lib}: padded to 32 vs 64, masks", f"{pearson(a, b):.9f}", f"{rel(a, b):.2e}"))
    for lib in ("sketchattr", "kronfluence"):
        a, b = scores[lib, 32, False], scores[lib, 64, False]
        rows.append((name, f"control, {lib} without mask: 32 vs 64", f"{pearson(a, b):.6f}", f"{rel(a, b):.2e}"))
    a, b = scores["sketchattr", 64, False], scores["kronfluence", 64, True]
    rows.append((name, "control: sketchattr without mask vs Kronfluence with, 64", f"{pearson(a, b):.6f}", f"{rel(b, a):.2e}"))
    return rows


if __name__ == "__main__":
    main()
