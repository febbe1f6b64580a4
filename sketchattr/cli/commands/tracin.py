"""``sketchattr tracin``: TracIn, SOURCE or EKFAC over saved checkpoints, from files, to a JSON report.

``--scorer tracin`` (default) sums the checkpoints' gradient dot products weighted by η_c;
``--scorer source`` is training-aware influence (SOURCE, Bae et al. 2024): each checkpoint stands
for one segment of the run, EKFAC factors are fitted at each, and segment ℓ's weight is
c_ℓ = η_ℓ × ``--steps_per_segment`` (the learning rate summed over the segment's optimizer steps;
see :mod:`sketchattr.score.source` for the units, momentum and Adam);
``--scorer ekfac`` is EKFAC fitted at every checkpoint, each checkpoint's scores divided by their
RMS per test example, then averaged (:func:`sketchattr.ekfac_ensemble`; no learning rates).

Inputs
------
Model: ``--model_def module:function`` names a Python callable that returns an ``nn.Module``
(e.g. ``sketchattr.bench.models.mlp:make_mlp``), called with the keyword arguments of
``--model_kwargs '{"in_dim": 64}'`` (JSON, default none). Each checkpoint given to
``--checkpoints ck1.pt ck2.pt ...`` is a *state dict* of that module saved with
``torch.save(model.state_dict(), path)``; it is loaded with ``torch.load(weights_only=True)``.
``--learning_rates`` gives η_c per checkpoint (default 1.0 each; one value is used for all).

Data: ``--train_data`` and ``--test_data`` are either

* ``.pt`` files holding a dict of tensors ``{"x": [N, ...], "y": [N]}`` saved with
  ``torch.save`` (loaded with ``weights_only=True``), or
* ``.npz`` files with arrays ``x`` and ``y`` (``numpy.savez``).

Floating ``x`` is cast to the model's dtype; ``y`` holds class indices (classification) or
targets (``--task regression``). ``--stratify_by labels`` stratifies the train sample by ``y``;
``--stratify_by NAME`` uses another per-example array ``NAME`` of the train file.

Output (``--output results.json``)
----------------------------------
::

    {"settings": {... every option, projector spec, module names and sizes, n_train,
                  n_scored_train, checkpoints, learning_rates ...},
     "results": [{"test_index": i, "label": y_i,
                  "proponents": [{"train_index": j, "score": s}, ...],   # top-k, highest first
                  "opponents":  [{"train_index": j, "score": s}, ...]},  # top-k, lowest first
                 ...],
     "timings": {"load_s", "featurize_train_s", "score_s", "total_s", "per_query_s"},
     "memory": {"train_rows_bytes": {...}, "train_rows_total_bytes", "query_cache_bytes", ...}}

Scores follow docs/design.md: ``score = −Σ_c η_c ∇f_c(z_test)ᵀ∇ℓ_c(z_train)`` (TracIn), or SOURCE's
``−Σ_ℓ ∇f(z_test)ᵀ S_L⋯S_{ℓ+1} F_ℓ ∇ℓ_ℓ(z_train)`` at the last checkpoint; positive = the train
example helps the test example (margin measurement for classification). Train indices are
indices of the train file's rows (also after sampling).

``--mode batch`` scores every test index at once; ``--mode single`` one test index at a time
(query gradients computed per example, memory O(1) queries).

On success it prints what it wrote (the report's path, how many test examples × top-k over how
many train rows, the seconds per stage); ``--show N`` adds the top-k of the first N test examples.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sketchattr.cli.model_loading import load_function, read_state_dict
from sketchattr.data.local_files import read_pt
from sketchattr.sample import make_sampler
from sketchattr.score.ekfac_ensemble import ekfac_ensemble
from sketchattr.score.ensemble import EnsembleInfluence
from sketchattr.score.source import SourceInfluence, source_from_checkpoints
from sketchattr.score.tracin import tracin_from_checkpoints
from sketchattr.task import ClassificationTask, RegressionTask

HELP = "TracIn, SOURCE or EKFAC over saved checkpoints (last-N layers, random projection, sampling) -> JSON"
DESCRIPTION = ("TracIn: scores = -sum_c lr_c grad f_c(test) . grad loss_c(train) over checkpoints; "
               "--scorer source: training-aware influence over the segments the checkpoints stand for; "
               "--scorer ekfac: EKFAC at every checkpoint, averaged.")
SIGNS = {
    "tracin": "score = -sum_c lr_c grad f_c(test).grad loss_c(train); positive = helps the test example",
    "source": "score = -sum_l grad f(test)^T S_L..S_{l+1} F_l grad loss_l(train) (SOURCE); positive = helps the test example",
    "ekfac": "score = mean_c s_c / rms_c, s_c = -grad f_c(test)^T (F_c + lambda_c)^-1 grad loss_c(train) (EKFAC at checkpoint c); "
             "positive = helps the test example",
}
EPILOG = __doc__[__doc__.index("Inputs") :]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``tracin`` subcommand's options."""
    p.add_argument("--model_def", "--model-def", required=True, help="module:function returning the nn.Module (e.g. sketchattr.bench.models.mlp:make_mlp)")
    p.add_argument("--model_kwargs", "--model-kwargs", default="{}", help="JSON dict of keyword arguments for the model function")
    p.add_argument("--checkpoints", nargs="+", required=True, help="state-dict files (torch.save(model.state_dict()))")
    p.add_argument("--learning_rates", "--learning-rates", type=float, nargs="+", default=None, help="eta per checkpoint (default 1.0 each)")
    p.add_argument("--scorer", choices=["tracin", "source", "ekfac"], default="tracin",
                   help="tracin (default); source: training-aware influence, EKFAC fitted at every checkpoint; "
                        "ekfac: EKFAC at every checkpoint, averaged (the language-model pick)")
    p.add_argument("--steps_per_segment", "--steps-per-segment", type=float, nargs="+", default=None,
                   help="--scorer source: optimizer steps each checkpoint's segment stands for (one value: all)")
    p.add_argument("--fisher", choices=["true", "empirical"], default="true", help="--scorer source / ekfac: the EKFAC factors' Fisher")
    p.add_argument("--train_data", "--train-data", required=True, help=".pt dict {'x','y'} or .npz with x, y")
    p.add_argument("--test_data", "--test-data", required=True, help=".pt dict {'x','y'} or .npz with x, y")
    p.add_argument("--task", choices=["classification", "regression"], default="classification")
    p.add_argument("--use_projection", "--use-projection", action="store_true", help="randomly project gradients (else exact)")
    p.add_argument("--projection_dim", "--projection-dim", type=int, default=256)
    p.add_argument("--projection_type", "--projection-type", choices=["gaussian", "sjlt", "sparse", "rademacher"], default="gaussian",
                   help="'sparse' = sjlt")
    p.add_argument("--sample_rate", "--sample-rate", type=float, default=1.0, help="fraction of train rows scored (default 1.0)")
    p.add_argument("--stratify_by", "--stratify-by", default=None, help="'labels' (y) or the name of an array in the train file")
    p.add_argument("--num_last_layers", "--num-last-layers", type=int, default=None, help="attribute through the last N layers only")
    p.add_argument("--top_k", "--top-k", type=int, default=10)
    p.add_argument("--mode", choices=["single", "batch"], default="batch")
    p.add_argument("--test_indices", "--test-indices", type=int, nargs="+", default=None, help="test rows to explain (default all)")
    p.add_argument("--output", required=True, help="JSON report path")
    p.add_argument("--variant", choices=["dot", "cos"], default="dot")
    p.add_argument("--seed", type=int, default=0, help="projector and sampler seed")
    p.add_argument("--batch_size", "--batch-size", type=int, default=64)
    p.add_argument("--store", choices=["none", "cpu", "disk"], default="none", help="where train rows are kept")
    p.add_argument("--store_path", "--store-path", default=None, help="HDF5 file for --store disk (one group per checkpoint)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--no_progress", "--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="also print the top-k proponents/opponents of the first N test examples (default 0: only the summary)")


def load_data(path: str) -> dict[str, torch.Tensor]:
    """{"x": tensor [N, ...], "y": tensor [N], ...} from a .pt dict or a .npz file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as f:
            data = {k: torch.from_numpy(np.asarray(f[k])) for k in f.files}
    else:
        data = read_pt(p)  # torch.load(weights_only=True); a refused or damaged file is a DataError
        if not isinstance(data, dict):
            raise ValueError(f"{p} must hold a dict of tensors {{'x': ..., 'y': ...}}, found {type(data).__name__}")
        data = {k: torch.as_tensor(v) for k, v in data.items()}
    for key in ("x", "y"):
        if key not in data:
            raise ValueError(f"{p} has no {key!r} entry (found {sorted(data)})")
    if data["x"].shape[0] != data["y"].shape[0] or data["x"].shape[0] == 0:
        raise ValueError(f"{p}: x has {data['x'].shape[0]} rows and y {data['y'].shape[0]}; need equal and > 0")
    return data


def segment_lr_steps(args: argparse.Namespace, lrs: list[float]) -> list[float]:
    """SOURCE's c_ℓ = η_ℓ × steps_ℓ per checkpoint, from --learning_rates and --steps_per_segment."""
    if args.variant != "dot":
        raise ValueError("--variant cos is TracIn's; --scorer source has no cosine variant (leave --variant at dot)")
    steps = args.steps_per_segment
    if steps is None:
        raise ValueError("--scorer source needs --steps_per_segment: how many optimizer steps each checkpoint's segment "
                         "stands for (e.g. the steps per epoch when a checkpoint was saved every epoch)")
    steps = steps * len(lrs) if len(steps) == 1 else list(steps)
    if len(steps) != len(lrs) or any(not (v >= 0) for v in steps):
        raise ValueError(f"--steps_per_segment: need one value >= 0 per checkpoint ({len(lrs)}) or one for all, got {args.steps_per_segment}")
    return [lr * n for lr, n in zip(lrs, steps)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from torch.utils.data import Subset, TensorDataset


    t0 = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    make = load_function(args.model_def, flag="--model_def")
    kwargs = json.loads(args.model_kwargs)
    models = []
    for ck in args.checkpoints:
        model = make(**kwargs)
        model.load_state_dict(read_state_dict(ck, model, flag="--checkpoints"))
        models.append(model.to(device))
    lrs = args.learning_rates if args.learning_rates is not None else [1.0] * len(models)
    if len(lrs) == 1:
        lrs = lrs * len(models)
    if len(lrs) != len(models):
        raise ValueError(f"{len(lrs)} learning rates for {len(models)} checkpoints")
    dtype = next(models[0].parameters()).dtype
    train, test = load_data(args.train_data), load_data(args.test_data)

    def dataset(d: dict[str, torch.Tensor]) -> TensorDataset:
        x = d["x"].to(dtype) if d["x"].is_floating_point() else d["x"]
        y = d["y"] if args.task == "classification" else d["y"].to(dtype)
        return TensorDataset(x, y.long() if args.task == "classification" else y)

    train_set, test_set = dataset(train), dataset(test)
    n_test = len(test_set)
    test_idx = list(range(n_test)) if args.test_indices is None else list(args.test_indices)
    bad = [i for i in test_idx if not 0 <= i < n_test]
    if bad:
        raise ValueError(f"--test_indices {bad} outside [0, {n_test})")

    sampler = None
    if args.sample_rate < 1.0 or args.stratify_by:
        if args.stratify_by in (None, ""):
            sampler = make_sampler("uniform", rate=args.sample_rate, seed=args.seed)
        elif args.stratify_by == "labels":
            sampler = make_sampler("stratified", key="labels", rate=args.sample_rate, seed=args.seed)
        elif args.stratify_by in train:
            sampler = make_sampler("stratified", key=train[args.stratify_by].numpy(), rate=args.sample_rate, seed=args.seed)
        else:
            raise ValueError(f"--stratify_by {args.stratify_by!r}: use 'labels' or an array of the train file ({sorted(train)})")
    projector = {"sparse": "sjlt"}.get(args.projection_type, args.projection_type) if args.use_projection else "identity"
    t_load = time.perf_counter()

    common = dict(projector=projector, m=args.projection_dim if args.use_projection else None, seed=args.seed,
                  modules=args.num_last_layers, sampler=sampler, store=args.store, path=args.store_path,
                  batch_size=args.batch_size, device=device, progress=not args.no_progress)
    task = ClassificationTask() if args.task == "classification" else RegressionTask()
    if args.scorer == "source":
        lr_steps = segment_lr_steps(args, lrs)
        scorer: Any = source_from_checkpoints(models, task, train_set, lr_steps, fisher=args.fisher, **common)
    elif args.steps_per_segment is not None:
        raise ValueError(f"--steps_per_segment is for --scorer source; --scorer {args.scorer} does not use it")
    elif args.scorer == "ekfac":
        if args.learning_rates is not None or args.variant != "dot":
            raise ValueError("--scorer ekfac averages EKFAC over the checkpoints with equal say: it takes no --learning_rates "
                             "and no --variant cos (those are TracIn's)")
        lr_steps = None
        scorer = ekfac_ensemble(models, task, train_set, fisher=args.fisher, **common)
    else:
        lr_steps = None
        scorer = tracin_from_checkpoints(models, task, train_set, learning_rates=lrs, variant=args.variant, **common)
    t_feat = time.perf_counter()
    k = min(args.top_k, len(scorer.train_indices))
    results, memory = [], None

    def add(indices: list[int], top: Any) -> None:
        for r, i in enumerate(indices):
            results.append({
                "test_index": int(i),
                "label": _jsonable(test["y"][i]),
                "proponents": [{"train_index": int(j), "score": float(s)} for j, s in zip(top.proponents[r], top.proponent_scores[r])],
                "opponents": [{"train_index": int(j), "score": float(s)} for j, s in zip(top.opponents[r], top.opponent_scores[r])],
            })

    if args.mode == "batch":
        add(test_idx, scorer.top_k(Subset(test_set, test_idx), k=k))
        memory = scorer.memory_footprint() if hasattr(scorer, "memory_footprint") else None
    else:
        from tqdm.auto import tqdm

        for i in tqdm(test_idx, desc=f"{args.scorer} single", unit="query", disable=args.no_progress):
            add([i], scorer.top_k(Subset(test_set, [i]), k=k))
            if hasattr(scorer, "clear_query_cache"):
                memory = scorer.memory_footprint()
                scorer.clear_query_cache()
    t_end = time.perf_counter()

    if isinstance(scorer, SourceInfluence):
        first = scorer.segments[0].featurizer
    elif isinstance(scorer, EnsembleInfluence):
        first = scorer.members[0].featurizer
    else:
        first = scorer.featurizers[0]
    sel = first.selection()
    report = {
        "settings": {
            **{key: (list(v) if isinstance(v, tuple) else v) for key, v in vars(args).items() if not callable(v)},
            "learning_rates": None if args.scorer == "ekfac" else lrs,
            "lr_steps": lr_steps,
            "projector": first.projector.spec(),
            "modules": sel.spec(),
            "n_parameters": sel.total,
            "n_train": len(train_set),
            "n_scored_train": int(len(scorer.train_indices)),
            "sampler": None if sampler is None else sampler.spec(),
            "top_k": k,
            "device": str(device),
            "sign": SIGNS[args.scorer],
        },
        "results": results,
        "timings": {
            "load_s": t_load - t0,
            "featurize_train_s": t_feat - t_load,
            "score_s": t_end - t_feat,
            "total_s": t_end - t0,
            "per_query_s": (t_end - t_feat) / max(len(test_idx), 1),
        },
        "memory": memory,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_summary(report, out, getattr(args, "show", 0))
    return report


def print_summary(report: dict[str, Any], path: Path, show: int = 0) -> None:
    """What ``run`` wrote: the file, the shape of the result, the seconds; the top-k of the
    first ``show`` test examples."""
    s, t = report["settings"], report["timings"]
    n_ck = len(s["checkpoints"])
    print(f"wrote {path}: top-{s['top_k']} proponents/opponents of {len(report['results'])} test examples over "
          f"{s['n_scored_train']:,} of {s['n_train']:,} train rows ({s.get('scorer', 'tracin')}, {n_ck} checkpoint{'s' if n_ck != 1 else ''}, "
          f"{s['n_parameters']:,} parameters, projector {s['projector']['type']}, {s['mode']} mode, {s['device']})")
    print(f"seconds: {t['total_s']:.2f} total (load {t['load_s']:.2f}, featurize train {t['featurize_train_s']:.2f}, "
          f"score {t['score_s']:.2f} = {t['per_query_s']:.3g} per test example)")
    fmt = lambda entries: ", ".join(f"train {e['train_index']} ({e['score']:+.3g})" for e in entries)
    for r in report["results"][: max(show, 0)]:
        print(f"test {r['test_index']} (label {r['label']})\n  helps: {fmt(r['proponents'])}\n  hurts: {fmt(r['opponents'])}")


def _jsonable(v: torch.Tensor) -> Any:
    return v.item() if v.numel() == 1 else v.tolist()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sketchattr tracin`` alone (``python -m sketchattr.cli.commands.tracin ...``)."""
    parser = argparse.ArgumentParser(prog="sketchattr")
    add_parser(parser.add_subparsers(dest="command", required=True))
    run(parser.parse_args(["tracin", *(argv or [])]))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
