"""Influence of ImageNet training images on validation queries for a ResNet-50, one process.

    python analyze.py --dataset_dir PATH_TO_IMAGENET --checkpoint resnet50.pth \\
        --query_gradient_rank -1 --query_batch_size 100 --train_batch_size 256 --factor_strategy ekfac

``--dataset_dir`` holds ``train/<class>/<images>`` and ``val/<class>/<images>`` (read with PIL;
resize 256, centre crop 224, ImageNet normalisation; nothing is downloaded). Train gradients
of the Conv2d/Linear layers are sketched once into a gradient store (``--proj_type``,
``--proj_dim``, ``--offload``); then either

* ``--factor_strategy ekfac|kfac|diagonal|identity``: curvature factors are fitted on the train
  images (``sketchattr.fit_factors``, saved and resumable) and the query gradients are
  preconditioned (optionally rank-truncated: ``--query_gradient_rank``), sketched and scored
  against the store; or
* ``--factor_strategy sketched``: regularized sketched influence (``SketchedInfluence``, auto
  damping) on the store.

Scores ``[n_query, n_train]`` (positive = the train image helps the query's margin) go to
``OUTPUT_DIR/scores.h5`` with the top-k in ``topk.json``; a per-stage profiler table is
printed at the end. ``ddp_analyze.py`` runs the same :func:`run` under torchrun with a
collective (each rank featurizes and scores a shard of the train rows).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

import sketchattr as sa
import sketchattr.distributed as sad
from sketchattr.core.profiler import Profiler
from sketchattr.data.image_folder import CenterCropTransform, ImageFolderDataset
from sketchattr.bench.data.registry import subsample_index
from sketchattr.distributed.featurize import check_enough_batches
from sketchattr.featurize.memory import physical_memory_bytes
from sketchattr.bench.models.resnet import checkpoint_num_classes, load_weights, resnet50, tiny_resnet
from sketchattr.score.ekfac import CurvatureScorer, PreparedQueries

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity", "sketched")
PROJ_TYPES = ("sjlt", "gaussian", "rademacher", "factorized", "identity")
FACTOR_KIND = {"ekfac": "ekfac", "kfac": "kfac", "diagonal": "diagonal"}
CURVATURE_SCORERS = {"ekfac": sa.EKFACScorer, "kfac": sa.KFACScorer, "diagonal": sa.DiagonalScorer}


class _Help(argparse.HelpFormatter):
    """Appends ``(default: ...)`` where there is a default the help text does not already name."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The example's command line (shared with ddp_analyze.py)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=_Help)
    data = ap.add_argument_group("data and model")
    data.add_argument("--dataset_dir", required=True, help="folder with train/<class>/ and val/<class>/ image folders")
    data.add_argument("--num_train", type=int, default=None, help="train images used (a seeded subset; default all)")
    data.add_argument("--num_query", type=int, default=1000, help="val images used as queries (seeded subset; -1 = all)")
    data.add_argument("--resize", type=int, default=256, help="shorter image side before the centre crop")
    data.add_argument("--crop", type=int, default=224, help="centre crop size")
    data.add_argument("--model", default="resnet50", choices=["resnet50", "tiny"], help="tiny: a 4-wide, 1-block-per-stage ResNet for tests")
    data.add_argument("--checkpoint", default=None, help="local state-dict file (torch.load weights_only); default: random weights")
    data.add_argument("--num_classes", type=int, default=None, help="model outputs (default: the checkpoint's fc, else the class folders)")
    infl = ap.add_argument_group("influence")
    infl.add_argument("--factor_strategy", default="ekfac", choices=STRATEGIES, help="curvature, or 'sketched' (regularized sketched influence)")
    infl.add_argument("--query_gradient_rank", type=int, default=-1, help="rank of each preconditioned query matrix (-1: full rank)")
    infl.add_argument("--query_batch_size", type=int, default=100, help="query images per gradient batch")
    infl.add_argument("--train_batch_size", type=int, default=256, help="train images per gradient batch (store)")
    infl.add_argument("--factor_batch_size", type=int, default=None, help="images per factor-fitting batch (default: --train_batch_size)")
    infl.add_argument("--fisher", default="true", choices=["true", "empirical"], help="labels of the factor passes: sampled or the data's")
    infl.add_argument("--damping", type=float, default=None, help="λ (default: 0.1·mean eigenvalue per module; sketched: auto)")
    infl.add_argument("--use_half_precision", action="store_true", help="run the network in bfloat16 (factors accumulate in float32)")
    infl.add_argument("--factor_dtype", default="float32", choices=["float32", "float64"],
                      help="dtype of the factors and of the query preconditioning (eigendecompositions always run in float64)")
    infl.add_argument("--memory_budget_gib", type=float, default=None,
                      help="memory for the query side of the factor strategies (factors + one batch of preconditioned query "
                           "gradients); --query_batch_size is lowered to fit (default: half the GPU's memory, or half the "
                           "RAM shared by the local processes)")
    sk = ap.add_argument_group("sketch and store")
    sk.add_argument("--proj_type", default="sjlt", choices=PROJ_TYPES, help="projector of the train store (factorized: per-layer P_out⊗P_in)")
    sk.add_argument("--proj_dim", type=int, default=4096, help="sketch size m (factorized: m_out·m_in per layer, a square)")
    sk.add_argument("--offload", default="disk", choices=["none", "cpu", "disk"], help="where the store lives (disk: HDF5, resumable)")
    out = ap.add_argument_group("output and run")
    out.add_argument("--output_dir", default="./influence_results", help="scores.h5, topk.json, summary.json")
    out.add_argument("--cache_dir", default=None, help="store and factors (default: OUTPUT_DIR/cache); reruns resume from it")
    out.add_argument("--top_k", type=int, default=10, help="proponents/opponents kept per query")
    out.add_argument("--show_queries", type=int, default=3, help="queries whose top-k are printed")
    out.add_argument("--seed", type=int, default=0, help="subsets, projector and sampled Fisher labels")
    out.add_argument("--device", default="auto", help="where gradients are computed: auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:1, ...")
    out.add_argument("--overwrite", action="store_true", help="recompute a cached store/factors made with other settings")
    out.add_argument("--no_progress", action="store_true", help="no tqdm bars")
    return ap


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Parser-level consistency checks (``ap.error`` exits with the message)."""
    for name in ("query_batch_size", "train_batch_size", "proj_dim", "top_k", "resize", "crop"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.query_gradient_rank == 0 or args.query_gradient_rank < -1:
        ap.error(f"--query_gradient_rank must be -1 (full rank) or >= 1, got {args.query_gradient_rank}")
    if args.factor_strategy == "sketched" and args.query_gradient_rank != -1:
        ap.error("--query_gradient_rank applies to the factor strategies (ekfac, kfac, diagonal, identity), not 'sketched'")
    if args.proj_type == "factorized" and math.isqrt(args.proj_dim) ** 2 != args.proj_dim:
        ap.error(f"--proj_type factorized needs a square --proj_dim (m_out = m_in = √m), got {args.proj_dim}")
    if args.damping is not None and args.damping <= 0:
        ap.error(f"--damping must be > 0, got {args.damping}")
    if args.memory_budget_gib is not None and args.memory_budget_gib <= 0:
        ap.error(f"--memory_budget_gib must be > 0, got {args.memory_budget_gib}")
    if args.crop > args.resize:
        ap.error(f"--crop ({args.crop}) must be <= --resize ({args.resize})")
    args.factor_batch_size = args.factor_batch_size or args.train_batch_size
    args.device = resolve_device(args.device)
    args.cache_dir = args.cache_dir or os.path.join(args.output_dir, "cache")
    return args


def resolve_device(device: str) -> str:
    """``"auto"``: ``"cuda"`` when torch sees a GPU, else ``"cpu"``; any other name as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    return check_args(ap, ap.parse_args(argv))


# ---------------------------------------------------------------------------- data and model
@dataclass
class ImageData:
    """Train and query image folders with the chosen rows.

    train_index / query_index: positions into ``train`` / ``query`` (sorted); store rows and
    score columns carry train positions, score rows follow ``query_index``.
    """

    train: ImageFolderDataset
    query: ImageFolderDataset
    train_index: np.ndarray
    query_index: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    def train_subset(self) -> Subset:
        return Subset(self.train, self.train_index.tolist())

    def query_subset(self) -> Subset:
        return Subset(self.query, self.query_index.tolist())


def load_data(args: argparse.Namespace) -> ImageData:
    """``DATASET_DIR/train`` and ``DATASET_DIR/val`` (val labelled with train's classes), subsampled."""
    root = Path(args.dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--dataset_dir {root} does not exist")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"--dataset_dir {root} has no {' or '.join(missing)} folder (expected train/<class>/..., val/<class>/...)")
    transform = CenterCropTransform(resize=args.resize, crop=args.crop)
    train = ImageFolderDataset(root / "train", transform)
    query = ImageFolderDataset(root / "val", transform, classes=train.classes)
    n_query = None if args.num_query in (None, -1) or args.num_query >= len(query) else args.num_query
    return ImageData(
        train, query,
        subsample_index(len(train), args.num_train, args.seed, f"{root / 'train'} (--num_train)"),
        subsample_index(len(query), n_query, args.seed, f"{root / 'val'} (--num_query)"),
    )


def build_model(args: argparse.Namespace, num_classes: int, verbose: bool = True) -> nn.Module:
    """ResNet-50 (torchvision's when it imports) or the tiny ResNet, weights from ``--checkpoint``,
    on ``--device``, bfloat16 with ``--use_half_precision``, in eval mode (``verbose``: say
    when the weights are random)."""
    n_out = args.num_classes or (checkpoint_num_classes(args.checkpoint) if args.checkpoint else None) or num_classes
    if n_out < num_classes:
        raise ValueError(f"the model has {n_out} outputs but the data has {num_classes} classes")
    torch.manual_seed(args.seed)
    model = resnet50(n_out) if args.model == "resnet50" else tiny_resnet(n_out)
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    elif verbose:
        print("note: no --checkpoint given: random weights (the scores only exercise the pipeline)")
    dtype = torch.bfloat16 if args.use_half_precision else torch.float32
    return model.to(device=args.device, dtype=dtype).eval()


def tracked_modules(model: nn.Module) -> list[str]:
    """Names of the Conv2d and Linear layers (the modules attributed through; BatchNorm excluded)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def make_featurizer(args: argparse.Namespace, model: nn.Module, modules: list[str], batch_size: int) -> sa.Featurizer:
    """A featurizer with the ``--proj_type``/``--proj_dim`` projector (same seed ⇒ same sketch)."""
    if args.proj_type == "factorized":
        side = math.isqrt(args.proj_dim)
        projector: Any = sa.FactorizedProjector(m_out=side, m_in=side, seed=args.seed)
    else:
        projector = args.proj_type
    m = None if args.proj_type in ("identity", "factorized") else args.proj_dim
    return sa.Featurizer(model, sa.ClassificationTask(), modules=modules, projector=projector, m=m, seed=args.seed,
                         batch_size=batch_size, progress=not args.no_progress)


def _tag(args: argparse.Namespace) -> str:
    return "bf16" if args.use_half_precision else "fp32"


def factor_dtype(args: argparse.Namespace) -> torch.dtype:
    """dtype of the fitted factors and of the query preconditioning (``--factor_dtype``)."""
    return torch.float64 if args.factor_dtype == "float64" else torch.float32


def query_memory(model: nn.Module, modules: list[str], args: argparse.Namespace) -> tuple[int, int]:
    """(bytes per query, bytes of the factors) of the factor strategies' query side, estimated
    from the layer shapes: every query's full gradient of the attributed layers twice in the
    network dtype (the per-example gradient workspace and the gradient rows) and its
    preconditioned copy plus one temporary in the factor dtype (ResNet-50, float32, 224×224:
    16 bytes × 23.5M = 0.38 GB estimated, 0.36 GB measured); per layer with a weight [r, c] (a
    conv's c = in_channels·kh·kw, +1 with a bias) the eigenbases Q_S [r, r], Q_A [c, c] and the
    eigenvalues Λ [r, c] twice (Λ and the scorer's Λ + λ)."""
    f = 8 if args.factor_strategy == "identity" else factor_dtype(args).itemsize  # IdentityScorer works in float64
    g = 2 if args.use_half_precision else 4
    d = resident = 0
    layers = dict(sad.unwrap_model(model).named_modules())
    for name in modules:
        w, b = layers[name].weight, getattr(layers[name], "bias", None)
        r, c = w.shape[0], w[0].numel() + (b is not None)
        d += r * c
        resident += (r * r + c * c + 2 * r * c) * f if args.factor_strategy in ("ekfac", "kfac") else 2 * r * c * f
    if args.factor_strategy == "identity":
        resident = 0
    return d * (2 * g + 2 * f), resident


def memory_budget(args: argparse.Namespace) -> float:
    """``--memory_budget_gib`` in bytes; default half the GPU's memory, or half the machine's RAM
    shared by the processes torchrun started on it (``LOCAL_WORLD_SIZE``)."""
    if args.memory_budget_gib is not None:
        return args.memory_budget_gib * 2**30
    device = torch.device(args.device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2
    return physical_memory_bytes() / 2 / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def fit_query_batch(args: argparse.Namespace, model: nn.Module, modules: list[str], verbose: bool = True,
                    n_query: int | None = None) -> int:
    """``--query_batch_size``, lowered so that the factors and one batch of query gradients fit the
    memory budget (the factor strategies differentiate and precondition every parameter of every
    query in a batch: about 16 bytes × 23.5M parameters ≈ 0.38 GB per ResNet-50 query with float32
    factors, 24 bytes with float64, see :func:`query_memory`). ValueError when not even one query fits. ``verbose``:
    say when the batch is lowered below ``n_query`` (the number of queries, when known)."""
    if args.factor_strategy == "sketched":
        return args.query_batch_size  # query rows are sketched batch by batch (the featurizer checks its workspace)
    per_query, resident = query_memory(model, modules, args)
    budget = memory_budget(args)
    fits = int((budget - resident) // per_query)
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    if fits < 1:
        ways = "raise --memory_budget_gib, " + ("use --factor_dtype float32 " if args.factor_dtype == "float64" else "") + \
            "or use --factor_strategy sketched (no per-parameter query gradients)"
        raise ValueError(
            f"the {args.factor_strategy} factors ({gib(resident)}) and one query's gradient and preconditioned copy "
            f"({gib(per_query)}) do not fit the memory budget of {gib(budget)}: {ways}"
        )
    if fits < args.query_batch_size:
        if verbose and fits < (n_query or args.query_batch_size):  # else every query fits in one batch anyway
            print(f"note: --query_batch_size {args.query_batch_size} lowered to {fits}: each query's gradient and "
                  f"preconditioned copy take ~{gib(per_query)} and the factors {gib(resident)}, against a memory budget of "
                  f"{gib(budget)} (--memory_budget_gib)")
        return fits
    return args.query_batch_size


def store_path(args: argparse.Namespace, world_size: int | None = None) -> Path:
    """HDF5 file of the train store (``--offload disk``). A store written through torch.distributed
    by ``world_size`` processes (shard files joined read-only) is named apart: ``..._<W>procs.h5``."""
    size = "" if args.proj_type == "identity" else str(args.proj_dim)
    procs = f"_{world_size}procs" if world_size is not None else ""
    return Path(args.cache_dir) / f"train_store_{args.model}_{args.proj_type}{size}_{_tag(args)}{procs}.h5"


def featurize_train(args: argparse.Namespace, featurizer: sa.Featurizer, data: ImageData,
                    indices: np.ndarray | None = None, store: sa.GradientStore | None = None,
                    collective: sad.Collective | None = None) -> sa.GradientStore:
    """Sketch the train rows ``indices`` (default ``data.train_index``) into the ``--offload`` store.

    collective: distributed (:func:`sketchattr.distributed.featurize`): this rank sketches a
    batch-aligned shard of the rows and the returned store holds that shard; with ``--offload
    disk`` every rank writes ``<store>.rank<r>-of-<W>.h5`` and rank 0 joins them at
    ``store_path(args, W)``; ``store`` is not used.
    """
    idx = data.train_index if indices is None else indices
    dtype = {"storage_dtype": "bfloat16" if args.use_half_precision else "float32"} if args.offload == "disk" else {}
    if collective is not None:
        path = store_path(args, collective.world_size) if args.offload == "disk" else None
        return sad.featurize(featurizer, data.train, path=path, indices=idx, collective=collective, overwrite=args.overwrite,
                             store=args.offload, **dtype)
    if store is None:
        store = sa.make_store(args.offload, **({"path": store_path(args), **dtype} if args.offload == "disk" else {}))
    return featurizer.featurize(data.train, store=store, indices=idx, overwrite=args.overwrite)


def fit_curvature(args: argparse.Namespace, model: nn.Module, modules: list[str], data: ImageData,
                  collective: sad.Collective | None = None) -> sa.Factors | None:
    """Fit the strategy's factors on the train rows (saved under the cache dir, reloaded on a
    rerun; None when the strategy needs none); ``factors.profiler`` holds the stage timings.
    collective: each rank passes over a shard of the rows, sums all-reduced, rank 0 saves."""
    kind = FACTOR_KIND.get(args.factor_strategy)
    if kind is None:
        return None
    factors = sa.fit_factors(
        model, sa.ClassificationTask(), data.train_subset(), kind=kind, modules=modules, fisher=args.fisher,
        batch_size=args.factor_batch_size, dtype=factor_dtype(args),
        seed=args.seed, path=factors_path(args, kind), overwrite=args.overwrite, progress=not args.no_progress,
        collective=collective,
    )
    for tensors in factors.tensors.values():  # the covariances A, S: only their eigenbases are needed to score
        tensors.pop("A", None)
        tensors.pop("S", None)
    return factors


def factors_path(args: argparse.Namespace, kind: str) -> Path:
    """Folder of the factor stages (``..._f64`` with ``--factor_dtype float64``)."""
    f64 = "_f64" if args.factor_dtype == "float64" else ""
    return Path(args.cache_dir) / f"factors_{args.model}_{kind}_{args.fisher}_{_tag(args)}{f64}"


def build_scorer(args: argparse.Namespace, factors: sa.Factors | None, query_featurizer: sa.Featurizer,
                 store: sa.GradientStore, collective: sad.Collective | None = None) -> sa.Scorer:
    """The ``--factor_strategy`` scorer, fitted on the store (distributed: this rank's shard,
    with ``collective``; scores and top-k then cover every rank's rows)."""
    if args.factor_strategy == "sketched":
        return sa.SketchedInfluence(damping=args.damping or "auto").fit(store, collective=collective)
    rank = None if args.query_gradient_rank == -1 else args.query_gradient_rank
    if args.factor_strategy == "identity":
        scorer: sa.Scorer = sa.IdentityScorer(query_featurizer, query_rank=rank)
    else:
        scorer = CURVATURE_SCORERS[args.factor_strategy](factors, query_featurizer, damping=args.damping, query_rank=rank)
    return scorer.fit(store, collective=collective)


def prepare_queries(args: argparse.Namespace, scorer: sa.Scorer, query_featurizer: sa.Featurizer,
                    data: ImageData) -> "torch.Tensor | PreparedQueries":
    """Sketched query rows [n_query, m] (sketched) or preconditioned, sketched rows (factors)."""
    if isinstance(scorer, sa.SketchedInfluence):
        return query_featurizer.query_rows(data.query, data.query_index)
    return scorer.prepare_queries(data.query_subset())


def save_scores(args: argparse.Namespace, scorer: sa.Scorer, queries: Any, data: ImageData) -> tuple[Path, sa.TopK]:
    """Full scores to ``OUTPUT_DIR/scores.h5`` (``scores`` [n_query, n_train] float32,
    ``train_indices``, ``query_indices``) streamed over the store; top-k to ``topk.json``.
    Distributed (a scorer fitted with a collective): every rank writes its columns, rank 0 joins
    them into ``scores.h5`` and writes the rest."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scores.h5"
    k = min(args.top_k, len(scorer.train_indices))
    top = scorer.score_to_hdf5(queries, path, k=k)
    if scorer.collective is not None and not scorer.collective.is_main:
        return path, top
    with h5py.File(path, "a") as f:
        if "query_indices" in f:
            del f["query_indices"]
        f["query_indices"] = data.query_index
        f.attrs["factor_strategy"] = args.factor_strategy
        f.attrs["sign"] = "scores[q, i] > 0: train image i helps query q (margin); Kronfluence's sign is the opposite"
    items = []
    for q, qi in enumerate(data.query_index.tolist()):
        items.append({
            "query": int(qi), "query_path": data.query.samples[qi][0],
            "proponents": [{"train": int(i), "path": data.train.samples[int(i)][0], "score": float(s)}
                           for i, s in zip(top.proponents[q], top.proponent_scores[q])],
            "opponents": [{"train": int(i), "path": data.train.samples[int(i)][0], "score": float(s)}
                          for i, s in zip(top.opponents[q], top.opponent_scores[q])],
        })
    (out / "topk.json").write_text(json.dumps(items, indent=1))
    return path, top


def print_top_k(data: ImageData, top: sa.TopK, n_show: int, k_show: int = 3) -> None:
    """The first ``n_show`` queries' strongest proponents and opponents with their classes."""
    def name(ds: ImageFolderDataset, i: int) -> str:
        path, label = ds.samples[int(i)]
        return f"{ds.classes[label]}/{os.path.basename(path)}"

    for q, qi in enumerate(data.query_index[:n_show].tolist()):
        print(f"query {name(data.query, qi)}")
        for what, idx, sc in (("helps", top.proponents, top.proponent_scores), ("hurts", top.opponents, top.opponent_scores)):
            print(f"  {what}: " + ", ".join(f"{name(data.train, i)} ({s:+.3g})" for i, s in zip(idx[q][:k_show], sc[q][:k_show])))


# ---------------------------------------------------------------------------- driver
def _profile_rows(rows: list[tuple[str, float, int, float, float]]) -> list[dict[str, Any]]:
    return [dict(zip(("action", "mean_s", "calls", "total_s", "percent"), r)) for r in rows]


def slowest_rank(prof: Profiler, collective: sad.Collective) -> tuple[Profiler, float]:
    """Per stage, the records of the rank that spent longest in it, and the longest wall time
    (a collective call: every rank must take part)."""
    views = collective.gather_objects((dict(prof.durations), prof.wall))
    slowest = Profiler()
    for action in dict.fromkeys(a for durations, _ in views for a in durations):
        slowest.durations[action] = max((d.get(action, []) for d, _ in views), key=sum)
    return slowest, max(wall for _, wall in views)


def run(args: argparse.Namespace, collective: sad.Collective | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, Any]:
    """All stages; prints the top-k of a few queries and the profiler tables (stages, then the
    steps inside them); returns a summary (also in ``OUTPUT_DIR/summary.json``).

    collective / wrap (``ddp_analyze.py``): each rank featurizes, fits and scores its shard of
    the train rows with the sums and scores combined across ranks; ``wrap`` wraps the model
    (e.g. in DistributedDataParallel). Rank 0 prints and writes the outputs; the stage table
    is then followed by the slowest rank's.
    """
    main = collective is None or collective.is_main
    say = print if main else (lambda *_: None)
    prof, detail = Profiler(), Profiler()
    with prof.record("Load Data"):
        data = load_data(args)
    if collective is not None:  # before any work: ranks beyond the number of train batches would hold no rows
        check_enough_batches(len(data.train_index), args.train_batch_size, collective.world_size, "--train_batch_size")
    with prof.record("Build Model"):
        model = build_model(args, data.num_classes, verbose=main)
        model = wrap(model) if wrap is not None else model
        modules = tracked_modules(sad.unwrap_model(model))
        featurizer = make_featurizer(args, model, modules, args.train_batch_size)
        query_batch = fit_query_batch(args, sad.unwrap_model(model), modules, main, len(data.query_index))
        query_featurizer = make_featurizer(args, model, modules, query_batch)
    procs = f", {collective.world_size} processes" if collective is not None else ""
    say(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(modules)} Conv2d/Linear layers; "
        f"{len(data.train_index)} train / {len(data.query_index)} query images, {data.num_classes} classes{procs}; device {args.device}")
    with prof.record("Featurize Train (store)"):
        store = featurize_train(args, featurizer, data, collective=collective)
    factors = None
    if args.factor_strategy in FACTOR_KIND:
        with prof.record("Fit Factors"):
            factors = fit_curvature(args, model, modules, data, collective=collective)
        detail.merge(factors.profiler, "factors: ")
    with prof.record("Fit Scorer"):
        scorer = build_scorer(args, factors, query_featurizer, store, collective=collective)
    with prof.record("Prepare Queries"):
        queries = prepare_queries(args, scorer, query_featurizer, data)
    with prof.record("Compute + Save Pairwise Score"):
        path, top = save_scores(args, scorer, queries, data)
    if isinstance(scorer, CurvatureScorer):  # query gradients, preconditioning, store blocks
        detail.merge(scorer.profiler, "scorer: ")
    slowest = slowest_rank(prof, collective) if collective is not None and collective.world_size > 1 else None
    shape = (len(data.query_index), len(scorer.train_indices))
    summary = {
        "scores": str(path), "shape": list(shape), "factor_strategy": args.factor_strategy, "proj_type": args.proj_type,
        "proj_dim": store.dim, "n_train": len(data.train_index), "n_query": len(data.query_index),
        "damping": getattr(scorer, "damping_", None), "args": vars(args),
        "world_size": 1 if collective is None else collective.world_size, "query_batch_size_used": query_batch,
        "profile": _profile_rows(prof.rows()), "profile_detail": _profile_rows(detail.rows(prof.wall)),
    }
    if slowest is not None:
        summary["profile_slowest_rank"] = _profile_rows(slowest[0].rows(slowest[1]))
    if not main:
        return summary
    print_top_k(data, top, args.show_queries)
    Path(args.output_dir, "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"scores {shape} -> {path}")
    print(prof.table("Profiler: stages" + (" (rank 0)" if collective is not None else "")))
    if slowest is not None:
        print(slowest[0].table("Profiler: stages, slowest rank per stage", wall=slowest[1]))
    if detail.durations:
        title = "Profiler: inside the stages (percent of the whole run)" + (", rank 0" if collective is not None else "")
        print(detail.table(title, wall=prof.wall))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
