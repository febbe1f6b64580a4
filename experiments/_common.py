"""Plumbing shared by the experiment scripts: arguments, a cached trained model, exact gradients,
sketches of them, and output files. The maths lives in the package (sketchattr.validate)."""
from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sketchattr import ClassificationTask, Featurizer
from sketchattr.bench.data.registry import DatasetSplit, load_dataset
from sketchattr.bench.models.registry import make_model
from sketchattr.project import make_projector
from sketchattr.score.queries import QueryRows
from sketchattr.store import StoreMetadata, make_store
from sketchattr.task import CausalLMTask
from sketchattr.bench.train import train_model

PROJ_TYPES = {"normal": "gaussian", "gaussian": "gaussian", "rademacher": "rademacher", "sjlt": "sjlt"}


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The seed framework's options shared by both scripts."""
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist", "cifar2", "maestro"])
    ap.add_argument("--data_dir", default=None, help="folder of the local dataset files (not needed for digits)")
    ap.add_argument("--model", default="mlp", choices=["lr", "mlp", "resnet9", "musictransformer"])
    ap.add_argument("--proj_type", default="normal,rademacher,sjlt", help="comma list of normal | rademacher | sjlt")
    ap.add_argument("--batch_size", type=int, default=128, help="featurization batch size")
    ap.add_argument("--offload", default="none", choices=["none", "cpu", "disk"], help="where gradient stores live")
    ap.add_argument("--cache_dir", default="./grad_cache")
    ap.add_argument("--output_dir", default="./results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n_train", type=int, default=None, help="train rows (default: all; digits: 1000)")
    ap.add_argument("--n_test", type=int, default=None, help="test rows used as test gradients / queries")
    ap.add_argument("--quick", action="store_true", help="a small, fast setting (CI)")


def proj_types(arg: str) -> list[str]:
    names = [p.strip() for p in arg.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROJ_TYPES]
    if unknown:
        raise SystemExit(f"unknown --proj_type {unknown}; choose from normal, rademacher, sjlt")
    return names


def task_for(split: DatasetSplit):
    return CausalLMTask() if split.vocab_size else ClassificationTask()


def trained_model(args: argparse.Namespace, split: DatasetSplit) -> torch.nn.Module:
    """Train the model once per (dataset, model, sizes, seed); cached as a state dict (weights_only)."""
    model = make_model(args.model, split, seed=args.seed)
    key = f"{args.dataset}_{args.model}_n{len(split.train)}_s{args.seed}"
    path = Path(args.cache_dir) / f"model_{key}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t0 = time.perf_counter()
    model = train_model(model, split, seed=args.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    print(f"trained {args.model} on {args.dataset} ({len(split.train)} rows) in {time.perf_counter() - t0:.1f}s")
    return model.eval()


@dataclass
class Gradients:
    """Unsketched train gradients (a store) and test gradients [n_test, d], with module sizes."""

    featurizer: Featurizer
    train_store: Any
    test_rows: torch.Tensor
    dims: tuple[int, ...]


def exact_gradients(args: argparse.Namespace, model: torch.nn.Module, split: DatasetSplit, test_kind: str = "query") -> Gradients:
    """Identity-projector gradients of the train set (into the --offload store) and of the test set."""
    feat = Featurizer(model, task_for(split), projector="identity", batch_size=args.batch_size, device=args.device, progress=not args.quick)
    store_kwargs = {"path": Path(args.cache_dir) / f"exact_{args.dataset}_{args.model}_n{len(split.train)}_s{args.seed}.h5"} if args.offload == "disk" else {}
    store = feat.featurize(split.train, store=make_store(args.offload, **store_kwargs))
    test = feat.query_rows(split.test) if test_kind == "query" else feat.train_rows(split.test)
    return Gradients(feat, store, test, feat.selection().dims)


def sketch_rows(projector, rows: "torch.Tensor | QueryRows", dims: tuple[int, ...]) -> "torch.Tensor | QueryRows":
    """Sketch unsketched rows [n, d] module by module — the same linear map the featurizer applies.
    Query rows that carry their sketch come back carrying the new one (as :func:`sketch_store` records it)."""
    out = projector.project(list(torch.split(torch.as_tensor(rows.rows if isinstance(rows, QueryRows) else rows), list(dims), dim=1)))
    if not isinstance(rows, QueryRows):
        return out
    meta = rows.metadata and sketch_metadata(projector, dims, rows.metadata)
    return QueryRows(out, meta, rows.indices)


def sketch_metadata(projector, dims: tuple[int, ...], exact) -> "StoreMetadata":
    """Metadata of rows sketched from exact rows described by ``exact``."""
    return StoreMetadata(projector=projector.spec(), modules={"dims": list(dims)}, model_fingerprint=exact.model_fingerprint,
                         task=exact.task, dim=projector.output_dim(dims))


def sketch_store(projector, store, dims: tuple[int, ...], offload: str, path: Path | None = None):
    """A store of the sketched train rows, built block by block from the exact store."""
    out = make_store(offload, **({"path": path} if offload == "disk" else {}))
    meta = sketch_metadata(projector, dims, store.metadata)
    with out.writing():
        out.prepare(meta, overwrite=True)
        for idx, rows in store.iter_blocks():
            out.write(idx, sketch_rows(projector, rows, dims))
    return out


def make_sketch_projector(name: str, m: int, seed: int):
    return make_projector(PROJ_TYPES[name], m=m, seed=seed)


def write_outputs(output_dir: str, stem: str, summary: dict, rows: list[dict]) -> Path:
    """results/<stem>.json (summary + rows) and results/<stem>.csv (rows)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2, default=float))
    if rows:
        with open(out / f"{stem}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return out


def load_split(args: argparse.Namespace) -> DatasetSplit:
    return load_dataset(args.dataset, args.data_dir, n_train=args.n_train, n_test=args.n_test, seed=args.seed)


def pyplot():
    """matplotlib's pyplot on a file backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG (pip install matplotlib)")
        return None
