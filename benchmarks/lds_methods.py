"""Which method when, measured side by side: LDS (retraining ground truth) and seconds per method on
three language-model benches and two classifiers.

Benches (`sketchattr.bench.ground_truth`): language models — ``markov`` (4 sparse chains, 64 tokens),
``markov-wide`` (6 denser chains, 96 tokens, 12–32 per sequence) and ``prose`` (scikit-learn's
dataset descriptions as characters), each a 2-layer GPT-2 (106K parameters) trained with AdamW for
8 epochs, 400 train / 50 query sequences, ground truth 100 half-data subsets × 2 seeds; classifiers —
the digits MLP trained with SGD (momentum 0.9) and with Adam.

Methods (attributed modules: the linear layers):

* ``EKFAC`` on the unsketched store (damping "auto");
* ``SketchedInfluence`` (damping "auto") on the unsketched store;
* ``dot product`` (the identity scorer, TracIn at the last checkpoint);
* ``sparse eigenbasis d/8`` and ``sparse eigenbasis (width from the data)``: EKFAC reading
  :class:`~sketchattr.SparseEigenbasisProjector` stores, the latter at :func:`~sketchattr.curvature.sparse_width`;
* ``SOURCE`` (:class:`~sketchattr.SourceInfluence`): 4 segments between checkpoints of the same
  run (every 2 epochs for the LMs, every 15 for the MLP), EKFAC and train rows at each segment's
  end; c_ℓ = the learning rate summed over the segment's steps (SGD: ÷ (1 − momentum)); for Adam
  the median over coordinates of lr/(√v̂ + ε) at the checkpoint stands in for the lr (a scalar
  stand-in for Adam's per-coordinate steps; ``source_adam.py`` measures the per-coordinate form); the LMs'
  loss is divided by the batch's tokens, so c is divided by the mean tokens per sequence;
* ``EKFAC over the 4 checkpoints``: :func:`~sketchattr.ekfac_ensemble`, EKFAC at each of
  SOURCE's checkpoints (each member's scores divided by their RMS per query, then averaged): the
  cheap ensemble, no extra training;
* ``refined`` (:class:`~sketchattr.RefinedInfluence`): EKFAC-preconditioned conjugate gradients on the
  exact Gauss-Newton matrix over the whole training set (damping "auto": 10 × the mean EKFAC
  eigenvalue; the starting residual and at most 10 iterations, i.e. ≤ 11 G products per query
  batch, a query stopping at relative residual 0.05), scored against the exact store and against a
  sparse-eigenbasis d/8 store whose coordinates are ranked at the refined damping (``sa.refined_damping``).

    python benchmarks/lds_methods.py                    # everything (about 25 min on 2 cores, ground truth cached)
    python benchmarks/lds_methods.py --skip refined     # without the slow refined rows (about 4 min)
    python benchmarks/lds_methods.py --quick            # the markov bench with 20 subsets × 1 seed
"""
from __future__ import annotations

import argparse
import copy
import time
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

import sketchattr as sa
from sketchattr.bench.data.digits import load_digits_split
from sketchattr.bench.ground_truth import LM_BENCHES, bench_ground_truth, digits_ground_truth, lm_ground_truth
from sketchattr.bench.models.mlp import make_mlp
from sketchattr.bench.recipes import epoch_batches, query_margins, tiny_gpt2, train_classifier
from sketchattr.curvature import sparse_width
from sketchattr.score.source import Segment, SourceInfluence
from sketchattr.validate.lds import lds

ADAM_LR, SGD_LR, SGD_MOMENTUM = 1e-3, 0.05, 0.9
REFINE_ITERATIONS = 10


def adam_step(opt: torch.optim.Optimizer, lr: float) -> float:
    """The median over coordinates of Adam's step size lr / (sqrt(v̂) + ε) now."""
    steps = []
    for group in opt.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            st = opt.state[p]
            vhat = st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))
            steps.append((lr / (vhat.sqrt() + eps)).flatten())
    return float(torch.cat(steps).median())


def adam_second_moments(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adam's bias-corrected v̂ per parameter name now (for per-coordinate SOURCE, ``source_adam.py``)."""
    beta2 = opt.param_groups[0]["betas"][1]
    return {n: (opt.state[p]["exp_avg_sq"] / (1 - beta2 ** float(opt.state[p]["step"]))).clone()
            for n, p in model.named_parameters()}


class LMBench:
    """A language-model bench: the model trained as its ground truth's recipe, with checkpoints."""

    batch_size = 50

    def __init__(self, name: str, quick: bool, cache_dir: str) -> None:
        self.name, self.text = name, LM_BENCHES[name]()
        self.gt = lm_ground_truth(name, cache_dir, n_subsets=20 if quick else 100, n_seeds=1 if quick else 2, progress=True)
        self.task, self.collate = sa.CausalLMTask(), sa.PadCollator()
        self.checkpoints, self.lr_steps = self._train(epochs=8, every=2)
        self.model, self.train, self.queries = self.checkpoints[-1], self.text.train, self.text.queries

    def _train(self, epochs: int, every: int, seed: int = 0) -> tuple[list, list[float]]:
        """train_lm's run (AdamW 3e-3, wd 0.01, batch 16, ``seed``), a copy every ``every`` epochs and each
        segment's c (Adam's median step × steps ÷ mean tokens per sequence)."""
        model, data = tiny_gpt2(vocab=self.text.vocab, seed=seed), self.text.train
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        model.train()
        copies, cs, steps, tokens, self.adam = [], [], 0, [], []
        for epoch, batches in enumerate(epoch_batches(len(data), 16, epochs, seed), start=1):
            for idx in batches:
                batch = self.collate([data[i] for i in idx.tolist()])
                n_tok = batch["attention_mask"][:, 1:].sum()
                tokens.append(float(n_tok) / len(idx))
                loss = self.task.train_loss(model, batch) / n_tok
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
            if epoch % every == 0:
                copies.append(copy.deepcopy(model).eval())
                cs.append(adam_step(opt, 3e-3) * steps / np.mean(tokens))
                self.adam.append((adam_second_moments(opt, model), 3e-3 * steps / np.mean(tokens)))  # (v̂, Σ lr per loss unit)
                steps = 0
        return copies, cs

    def featurizer(self, model=None, projector="identity", m=None) -> sa.Featurizer:
        return sa.Featurizer(model or self.model, self.task, modules="linear", projector=projector, m=m, batch_size=self.batch_size,
                             collate_fn=self.collate, progress=False)

    def factors(self, model=None) -> sa.Factors:
        return sa.fit_factors(model or self.model, self.task, self.train, kind="ekfac", modules="linear", batch_size=self.batch_size,
                              collate_fn=self.collate, progress=False)


class DigitsBench:
    """The digits MLP (SGD, the bench recipe; or Adam lr 1e-3), with checkpoints every 15 of 60 epochs."""

    batch_size, collate = 250, None

    def __init__(self, optimizer: str, quick: bool, cache_dir: str) -> None:
        self.name = f"digits-mlp ({optimizer})"
        split = load_digits_split()
        self.split, self.optimizer = split, optimizer
        k, r = (20, 1) if quick else (100, 2)
        if optimizer == "sgd":
            self.gt = digits_ground_truth(cache_dir, n_subsets=k, n_seeds=r, progress=True)
        else:
            train = lambda subset, seed: self._run((split.x_train[subset], split.y_train[subset]), seed)[0][-1]
            self.gt = bench_ground_truth("digits_mlp_adam", train, partial(query_margins, split=split), len(split.y_train),
                                         {"bench": "digits-mlp-adam", "optimizer": f"Adam lr {ADAM_LR}"}, cache_dir, k, 0.5,
                                         r, 0, True, None)
        self.task = sa.ClassificationTask()
        self.adam: list = []
        self.checkpoints, self.lr_steps = self._run((split.x_train, split.y_train), 0, self.adam)
        self.model = self.checkpoints[-1]
        self.train, self.queries = split.train_dataset(), split.query_dataset()

    def _run(self, rows, seed: int, adam_log: list | None = None) -> tuple[list, list[float]]:
        """One training run: checkpoints every 15 epochs and each segment's c; ``adam_log`` gets (v̂, Σ lr)."""
        copies, cs, state = [], [], {}
        steps_per_epoch = -(-len(rows[1]) // 64)
        adam = None if self.optimizer == "sgd" else (lambda params: state.setdefault("opt", torch.optim.Adam(params, lr=ADAM_LR)))

        def keep(epoch: int, model) -> None:
            if epoch % 15 == 0:
                copies.append(copy.deepcopy(model).eval())
                step = SGD_LR / (1 - SGD_MOMENTUM) if adam is None else adam_step(state["opt"], ADAM_LR)
                cs.append(step * 15 * steps_per_epoch)
                if adam is not None and adam_log is not None:
                    adam_log.append((adam_second_moments(state["opt"], model), ADAM_LR * 15 * steps_per_epoch))

        train_classifier(make_mlp(seed=seed), *rows, seed=seed, optimizer=adam, on_epoch_end=keep)
        return copies, cs

    def featurizer(self, model=None, projector="identity", m=None) -> sa.Featurizer:
        return sa.Featurizer(model or self.model, self.task, modules="linear", projector=projector, m=m, batch_size=self.batch_size,
                             progress=False)

    def factors(self, model=None) -> sa.Factors:
        return sa.fit_factors(model or self.model, self.task, self.train, kind="ekfac", modules="linear", batch_size=self.batch_size,
                              progress=False)


def methods(bench, skip: tuple[str, ...] = ()) -> list[tuple[str, str, float, float]]:
    """(method, store columns, LDS, seconds) for one bench; methods whose name contains a word of ``skip``
    are left out (EKFAC, the reference, never is)."""
    L = lambda s: lds(s.double().cpu().numpy(), bench.gt.masks, bench.gt.outputs).mean
    rows = []

    def run(name: str, fn) -> None:
        if any(word.lower() in name.lower() for word in skip) and name != "EKFAC":
            return
        t0 = time.perf_counter()
        scores, columns = fn()
        rows.append((name, columns, L(scores), time.perf_counter() - t0))

    def exact():
        feat = bench.featurizer()
        store, factors = feat.featurize(bench.train), bench.factors()
        bench.exact = (feat, store, factors)
        return sa.EKFACScorer(factors, feat).fit(store).score(bench.queries), f"d = {store.dim:,}"

    run("EKFAC", exact)
    feat, store, factors = bench.exact
    d = store.dim
    run("SketchedInfluence", lambda: (sa.SketchedInfluence(featurizer=feat).fit(store).score(bench.queries), f"d = {d:,}"))
    run("dot product", lambda: (sa.IdentityScorer(feat).fit(store).score(bench.queries), f"d = {d:,}"))

    sparse_stores = {}

    def sparse(m, scorer=sa.EKFACScorer, damping="auto", **options):
        """``scorer`` on a sparse-eigenbasis store of width m whose coordinates are ranked at ``damping``."""
        if (m, damping) not in sparse_stores:
            f = bench.featurizer(projector=sa.SparseEigenbasisProjector(m, factors, damping=damping))
            sparse_stores[m, damping] = (f, f.featurize(bench.train))
        f, s = sparse_stores[m, damping]
        return scorer(factors, f, **options).fit(s).score(bench.queries)

    run("sparse eigenbasis d/8", lambda: (sparse(2 * (d // 16)), f"{2 * (d // 16):,}"))

    def chosen():
        width = sparse_width(factors, feat, bench.train)
        return sparse(width.m), f"{width.m:,} (d/{d / width.m:.1f})"

    run("sparse eigenbasis, width from the data", chosen)

    def source():
        segments, stores = [], []
        for model, c in zip(bench.checkpoints, bench.lr_steps):
            f = bench.featurizer(model)
            stores.append(f.featurize(bench.train))
            segments.append(Segment(bench.factors(model), f, c))
        scores = SourceInfluence(segments).fit(stores).score(bench.queries)
        return scores, f"{len(segments)} × d"

    run("SOURCE (4 segments)", source)

    def checkpoint_ensemble():
        ens = sa.ekfac_ensemble(bench.checkpoints, bench.task, bench.train, modules="linear", batch_size=bench.batch_size,
                                collate_fn=bench.collate, progress=False)
        return ens.score(bench.queries), f"{ens.n_members} × d"

    run("EKFAC over the 4 checkpoints (ensemble)", checkpoint_ensemble)

    def refined(m=None):
        refiner = dict(train_dataset=bench.train, iterations=REFINE_ITERATIONS)
        scores = (sparse(m, sa.RefinedInfluence, damping=sa.refined_damping(factors), **refiner) if m else
                  sa.RefinedInfluence(factors, feat, **refiner).fit(store).score(bench.queries))
        return scores, f"{m:,}" if m else f"d = {d:,}"

    run(f"refined (≤ {REFINE_ITERATIONS} G products)", refined)
    run(f"refined (≤ {REFINE_ITERATIONS} G products), sparse d/8", lambda: refined(2 * (d // 16)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the markov bench only, ground truth 20 subsets × 1 seed")
    parser.add_argument("--benches", nargs="+", default=None, help="markov markov-wide prose digits-sgd digits-adam")
    parser.add_argument("--skip", nargs="+", default=[], help="leave out methods whose name contains any of these words "
                                                                "(e.g. refined: the slow rows)")
    parser.add_argument("--cache_dir", default="grad_cache")
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = args.benches or (["markov"] if args.quick else ["markov", "markov-wide", "prose", "digits-sgd", "digits-adam"])
    table = []
    for name in tqdm(names, desc="benches"):
        bench = (DigitsBench(name.split("-")[1], args.quick, args.cache_dir) if name.startswith("digits")
                 else LMBench(name, args.quick, args.cache_dir))
        for method, columns, value, seconds in methods(bench, tuple(args.skip)):
            table.append((bench.name, method, columns, value, seconds))
            print(f"  {bench.name:<20} {method:<40} {columns:>18}  LDS {value:.3f}  {seconds:6.1f} s", flush=True)
    print("\n| bench | method | store columns | LDS | × EKFAC | seconds |\n|---|---|---|---|---|---|")
    ekfac = {b: v for b, m, _, v, _ in table if m == "EKFAC"}
    for b, m, cols, v, s in table:
        print(f"| {b} | {m} | {cols} | {v:.3f} | {v / ekfac[b]:.2f} | {s:.1f} |")


if __name__ == "__main__":
    main()
