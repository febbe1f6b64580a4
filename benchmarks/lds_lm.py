"""Transformer LDS bench: which sketched attribution keeps EKFAC's quality on a language model?

Bench (`sketchattr.bench.data.markov`, `sketchattr.bench.recipes.train_markov_lm`): a 2-layer Hugging Face
GPT-2 (106K parameters) trained with AdamW on 400 generated sequences of 16–24 tokens from a
mixture of four sparse Markov chains (padded batches, attention masks); 50 query sequences,
measurement = the query's log-likelihood. Ground truth: 100 half-data subsets × 2 training seeds
(`markov_lm_ground_truth`, cached in grad_cache/, ~80 s on 2 cores the first time). Attribution
runs through the 8 Conv1D layers (d = 99,456; the output layer is tied to the embedding).

Rows, one per method (the columns a training example costs in the store):

* EKFAC on the unsketched store (the target), and the gradient dot product;
* SketchedInfluence (regularized, damping="auto", and the best λ of a grid — an oracle) on the
  exact store, an SJLT sketch, and the factorized / FactGraSS sketches;
* EKFAC reading an SJLT store;
* LoGra-style: per-layer k × k projections of layer inputs and output gradients, EKFAC fitted in
  the projected space (token-level projected covariances, Λ from the projected train rows);
* EigenbasisProjector + EKFACScorer: the m EKFAC eigen-coordinates with the largest Λ/λ, exact
  EKFAC on them (see sketchattr/curvature/eigenbasis.py);
* SparseEigenbasisProjector + EKFACScorer: per example, its own m/2 largest whitened
  eigen-coordinates (values + indices: m columns).

    python benchmarks/lds_lm.py [--quick] [--fisher true|empirical]
    PYTHONPATH=. <kronfluence venv>/bin/python benchmarks/lds_lm.py --kronfluence   # adds Kronfluence's EKFAC

``--quick``: 20 subsets × 1 seed of ground truth, fewer widths (a smoke run; the LDS is noisier).
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch

import sketchattr as sa
from sketchattr.bench.data.markov import markov_text
from sketchattr.featurize.engine import HookEngine
from sketchattr.bench.recipes import train_markov_lm
from sketchattr.bench.ground_truth import markov_lm_ground_truth
from sketchattr.validate.lds import lds

GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # λ / σ_max
MODULES = "linear"


class Bench:
    def __init__(self, quick: bool, fisher: str, cache_dir: str) -> None:
        self.text = markov_text()
        self.gt = markov_lm_ground_truth(cache_dir, n_subsets=20 if quick else 100, n_seeds=1 if quick else 2, progress=True)
        self.model = train_markov_lm(seed=0, text=self.text)
        self.task, self.collate = sa.CausalLMTask(), sa.PadCollator()
        self.fisher = fisher
        self.rows: list[tuple[str, str, float, float]] = []
        self._factors: dict[str, sa.Factors] = {}

    def featurizer(self, projector="identity", m=None, **kw) -> sa.Featurizer:
        return sa.Featurizer(self.model, self.task, modules=MODULES, projector=projector, m=m, batch_size=50,
                             collate_fn=self.collate, progress=False, **kw)

    def lds(self, scores: torch.Tensor) -> float:
        return lds(scores.double().cpu().numpy(), self.gt.masks, self.gt.outputs).mean

    def add(self, name: str, columns, value: float, seconds: float) -> None:
        self.rows.append((name, f"{columns:,}" if isinstance(columns, int) else str(columns), value, seconds))
        print(f"  {name:<58} {self.rows[-1][1]:>8}  LDS {value:.3f}  ({seconds:.1f}s)", flush=True)

    def factors(self, kind: str = "ekfac") -> sa.Factors:
        if kind not in self._factors:
            self._factors[kind] = sa.fit_factors(self.model, self.task, self.text.train, kind=kind, modules=MODULES,
                                                 fisher=self.fisher, batch_size=50, collate_fn=self.collate, progress=False)
        return self._factors[kind]

    # ------------------------------------------------------------------ methods
    def exact(self) -> None:
        t0 = time.perf_counter()
        feat = self.featurizer()
        self.exact_feat, self.exact_store = feat, feat.featurize(self.text.train)
        d = self.exact_store.dim
        ekfac = sa.EKFACScorer(self.factors(), feat).fit(self.exact_store)
        self.ekfac_lds = self.lds(ekfac.score(self.text.queries))
        self.add("EKFAC, unsketched store (the target)", d, self.ekfac_lds, time.perf_counter() - t0)
        dot = sa.IdentityScorer(feat).fit(self.exact_store)
        self.add("gradient dot product, unsketched", d, self.lds(dot.score(self.text.queries)), 0.0)
        self.sketched_influence("SketchedInfluence, exact F̂", feat, self.exact_store, d)

    def sketched_influence(self, name: str, feat: sa.Featurizer, store, columns: int) -> None:
        t0 = time.perf_counter()
        scorer = sa.SketchedInfluence(damping="auto").fit(store)
        q = feat.query_rows(self.text.queries)
        auto = self.lds(scorer.score(q))
        sigma = float(scorer.sigma.max())
        grid = [self.lds(scorer.score(q, damping=g * sigma)) for g in GRID]
        best = int(np.argmax(grid))
        self.add(f"{name}: auto λ / best of grid (λ={GRID[best]:g}·σ_max)", columns, auto, time.perf_counter() - t0)
        self.rows[-1] = (self.rows[-1][0], self.rows[-1][1], auto, self.rows[-1][3], grid[best])  # type: ignore[assignment]
        print(f"  {'':<58} {'':>8}  best {grid[best]:.3f}; grid {[round(x, 3) for x in grid]}")

    def sketches(self, m: int) -> None:
        feat = self.featurizer("sjlt", m)
        t0 = time.perf_counter()
        store = feat.featurize(self.text.train)
        self.sketched_influence(f"SketchedInfluence, SJLT m={m}", feat, store, m)
        ekfac = sa.EKFACScorer(self.factors(), feat).fit(store)
        self.add(f"EKFAC reading an SJLT m={m} store", m, self.lds(ekfac.score(self.text.queries)), time.perf_counter() - t0)
        for proj in (sa.FactorizedProjector(32, 32, seed=0), sa.FactGraSSProjector(8192, seed=0)):
            f = self.featurizer(proj)
            s = f.featurize(self.text.train)
            self.sketched_influence(f"SketchedInfluence, {proj.name} ({proj.spec().get('m_out')}×{proj.spec().get('m_in')})", f, s, s.dim)

    def logra(self, per_block: int) -> None:
        """LoGra-style: k×k projections per block, EKFAC fitted in the projected space."""
        t0 = time.perf_counter()
        k = int(math.isqrt(per_block))
        proj = sa.FactorizedProjector(k, k, seed=0)
        feat = self.featurizer(proj)
        store = feat.featurize(self.text.train)
        rows = torch.cat([r for _, r in store.iter_blocks()])
        blocks = feat.engine.blocks
        # token-level covariances of the projected factors (the Fisher's labels as fit_factors draws them)
        A = [torch.zeros(k, k, dtype=torch.float64) for _ in blocks]
        S = [torch.zeros(k, k, dtype=torch.float64) for _ in blocks]
        engine = HookEngine(self.model, feat.selection())
        loader = torch.utils.data.DataLoader(self.text.train, batch_size=50, collate_fn=self.collate)
        with engine.attached(), torch.random.fork_rng():
            torch.manual_seed(0)
            for batch in loader:
                cap = engine.run(lambda: self.task.train_loss(self.model, batch, sample=self.fisher == "true"),
                                 len(batch["input_ids"]), self.task.mask(batch))
                for b in range(len(blocks)):
                    for row, col in cap.factors(b):
                        pr = proj._sketch_side(row, b, 0).double().reshape(-1, k)
                        pc = proj._sketch_side(col, b, 1).double().reshape(-1, k)
                        S[b] += pr.T @ pr
                        A[b] += pc.T @ pc
        n = len(self.text.train)
        q = feat.query_rows(self.text.queries).double()
        g = rows.double()
        scores = torch.zeros(q.shape[0], g.shape[0], dtype=torch.float64)
        for b in range(len(blocks)):
            sl = slice(b * k * k, (b + 1) * k * k)
            qs, qa = torch.linalg.eigh(S[b] / n)[1], torch.linalg.eigh(A[b] / n)[1]
            rot = lambda x: qs.T @ x.reshape(-1, k, k) @ qa
            gr, qr = rot(g[:, sl]), rot(q[:, sl])
            lam = (gr**2).mean(0) if self.fisher == "empirical" else (gr**2).mean(0)
            damp = 0.1 * float(lam.mean())
            scores += -(qr / (lam + damp)).reshape(q.shape[0], -1) @ gr.reshape(g.shape[0], -1).T
        self.add(f"LoGra-style {k}×{k} per layer, EKFAC in the projected space", k * k * len(blocks), self.lds(scores),
                 time.perf_counter() - t0)

    def kronfluence(self, damping: float | None) -> None:
        """Kronfluence 1.0.1's EKFAC on the same model (Conv1D layers as the equivalent nn.Linear,
        which Kronfluence tracks), attention mask, true Fisher, pairwise scores."""
        import copy
        import logging
        import tempfile

        import torch.nn.functional as F
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task as KTask
        from kronfluence.utils.dataset import DataLoaderKwargs

        logging.disable(logging.WARNING)
        t0 = time.perf_counter()
        model = copy.deepcopy(self.model)
        names = list(self.exact_feat.selection().names)
        for name in names:  # transformers' Conv1D (y = x W + b, W [in, out]) -> nn.Linear(W.T, b)
            parent, child = name.rsplit(".", 1)
            conv = model.get_submodule(name)
            lin = torch.nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
            lin.weight.data, lin.bias.data = conv.weight.data.T.clone(), conv.bias.data.clone()
            setattr(model.get_submodule(parent), child, lin)
        ours = self.task

        class KfTask(KTask):
            def compute_train_loss(self, batch, model, sample=False):
                if not sample:
                    return ours.train_loss(model, batch)
                logits, targets = ours._predictions(model, batch)
                counted = targets != -100
                with torch.no_grad():
                    drawn = torch.multinomial(torch.softmax(logits[counted].detach(), -1), 1).reshape(-1)
                return F.cross_entropy(logits[counted], drawn, reduction="sum")

            def compute_measurement(self, batch, model):
                return -ours.measurement(model, batch)  # the query loss: Kronfluence's sign then equals ours

            def get_influence_tracked_modules(self):
                return names

            def get_attention_mask(self, batch):
                return batch["attention_mask"]

        task = KfTask()
        model = prepare_model(model, task)
        with tempfile.TemporaryDirectory() as out:
            analyzer = Analyzer(analysis_name="lm", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=out)
            kw = DataLoaderKwargs(collate_fn=self.collate)
            analyzer.fit_all_factors(factors_name="f", dataset=self.text.train, per_device_batch_size=50, dataloader_kwargs=kw,
                                     factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
            analyzer.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=self.text.queries,
                                             train_dataset=self.text.train, per_device_query_batch_size=50,
                                             per_device_train_batch_size=50, dataloader_kwargs=kw,
                                             score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores("s")["all_modules"]
        label = "default damping 1e-8" if damping == 1e-8 else "damping 0.1·mean(Λ)"
        self.add(f"Kronfluence 1.0.1 EKFAC, {label}", self.exact_store.dim, self.lds(scores), time.perf_counter() - t0)

    def eigenbasis(self, m: int) -> None:
        t0 = time.perf_counter()
        proj = sa.EigenbasisProjector(m, self.factors())
        feat = self.featurizer(proj)
        scorer = sa.EKFACScorer(self.factors(), feat).fit(feat.featurize(self.text.train))
        value = self.lds(scorer.score(self.text.queries))
        self.add(f"EigenbasisProjector + EKFAC (holds {proj.captured:.0%} of d_λ)", m, value, time.perf_counter() - t0)

    def eigen_topk(self, m: int) -> None:
        t0 = time.perf_counter()
        feat = self.featurizer(sa.SparseEigenbasisProjector(m - m % 2, self.factors()))
        scorer = sa.EKFACScorer(self.factors(), feat).fit(feat.featurize(self.text.train))
        self.add(f"SparseEigenbasisProjector + EKFAC ({m // 2:,} values + indices)", m - m % 2,
                 self.lds(scorer.score(self.text.queries)), time.perf_counter() - t0)


def plot(bench: Bench, path: str) -> None:
    """LDS against columns per training example for the sketches with a budget curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for prefix, label, style in (("LoGra", "LoGra-style (EKFAC in a random k×k projection)", "s--"),
                                 ("EigenbasisProjector", "EigenbasisProjector (global top Λ/λ)", "o-"),
                                 ("SparseEigenbasisProjector", "SparseEigenbasisProjector (per-example top-k)", "D-")):
        pts = sorted((int(c.replace(",", "")), v) for name, c, v, *_ in bench.rows if name.startswith(prefix))
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.axhline(bench.ekfac_lds, color="k", lw=1, label=f"EKFAC, unsketched ({bench.exact_store.dim:,} columns)")
    ax.axhline(0.95 * bench.ekfac_lds, color="k", lw=0.8, ls=":", label="0.95 × EKFAC")
    ax.axvline(bench.exact_store.dim / 8, color="grey", lw=0.8, ls="--", label="d / 8")
    ax.set_xscale("log")
    ax.set_xticks([2048, 4096, 8192, 16384, 32768])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(top=bench.ekfac_lds + 0.01)
    ax.set_xlabel("columns per training example")
    ax.set_ylabel("LDS (50 queries, 100 subsets × 2 seeds)")
    ax.set_title("Transformer LDS bench: sketch size against LDS")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fisher", default="true", choices=["true", "empirical"])
    ap.add_argument("--cache_dir", default="grad_cache")
    ap.add_argument("--methods", default="exact,sketches,logra,eigenbasis,eigen_topk")
    ap.add_argument("--kronfluence", action="store_true", help="also run Kronfluence's EKFAC (its own venv)")
    ap.add_argument("--plot", default=None, help="save the LDS-vs-columns curves to this PNG")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    bench = Bench(args.quick, args.fisher, args.cache_dir)
    methods = args.methods.split(",")
    print(f"markov-lm bench: {len(bench.text.train)} train / {len(bench.text.queries)} queries, "
          f"ground truth {bench.gt.masks.shape[0]} subsets; {args.fisher} Fisher")
    bench.exact()
    d = bench.exact_store.dim
    if args.kronfluence:
        for damping in (1e-8, None):
            bench.kronfluence(damping)
    if "sketches" in methods:
        bench.sketches(4096)
    budgets = [2048, 8192, 32768] if not args.quick else [2048, 8192]
    if "logra" in methods:
        for c in budgets:
            bench.logra(c // 8)
    if "eigenbasis" in methods:
        for c in sorted(set(budgets + ([d // 8] if args.quick else [d // 64, d // 32, d // 16, d // 8]))):
            if c <= d:
                bench.eigenbasis(c)
    if "eigen_topk" in methods:
        for c in sorted(set(([2048] if args.quick else budgets) + ([d // 8] if args.quick else [d // 16, d // 8]))):
            bench.eigen_topk(c)
    if args.plot:
        plot(bench, args.plot)
    print(f"\n| method | columns | LDS | × EKFAC |\n|---|---|---|---|")
    for name, cols, value, _secs, *best in bench.rows:
        print(f"| {name} | {cols} | {value:.3f}{f' / {best[0]:.3f}' if best else ''} | {value / bench.ekfac_lds:.2f} |")


if __name__ == "__main__":
    main()
