"""``sketchattr build``: sketch the training gradients of a user's model on a local dataset into
a resumable HDF5 store, and save the run spec beside it.

The weights come from ``--checkpoint`` (or a Hugging Face folder); a module:function model
without one is refused unless ``--random_init`` asks for its seeded initial weights. Before any
gradient it prints the label mapping (``labels: cat=0, dog=1 (...)``; ``--classes`` sets it) and
the model's accuracy or mean loss on the training file (one pass without gradients, at most
2,000 rows), and refuses a file that does not fit the model with one line naming both sides.

Writes ``--store`` (``DiskStore``: rows [n_train, m], dataset indices, per-row written flags) and
``<store stem>.run.json``. Running the same command again adds only the rows still missing
(after a crash, or a run cut short by ``--max_rows`` / ``--max_seconds``); other settings on an
existing store fail with the differences named (``--overwrite`` discards its rows).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from sketchattr.cli.config import CommandError, add_config_argument, add_runtime_arguments, parse_kwargs, require, resolve_device
from sketchattr.cli.fit_checks import quality_line
from sketchattr.cli.labels import add_classes_argument, check_classes, classes_source, label_line
from sketchattr.cli.model_loading import is_hf_folder, model_origin
from sketchattr.cli.spec import DTYPES, PROJECTORS, TASKS, RunSpec, absolute, model_reference, open_run, spec_path
from sketchattr.store import DiskStore

HELP = "sketch the training gradients of your model into a resumable HDF5 store"

REQUIRED = ("model", "task", "train_data", "store")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="module:function (or file.py:function) returning an nn.Module, or a local Hugging Face model folder")
    g.add_argument("--model_args", default=None, help="keyword arguments for the function (JSON object or key=value,key=value); "
                   "for a Hugging Face folder, extra from_pretrained arguments")
    g.add_argument("--checkpoint", default=None, help="state dict for module:function models (torch.save(model.state_dict()))")
    g.add_argument("--random_init", action="store_true", help="no --checkpoint: attribute the function's initial weights, "
                   "built under torch.manual_seed(--seed) (recorded in the run spec)")
    g.add_argument("--task", choices=TASKS, help="what to differentiate: cross-entropy / squared error / next-token loss")
    g.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer folder for text columns (default: the model folder's)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype of the gradients (default: the model's)")
    g.add_argument("--optimizer_state", default=None, help="Adam optimizer.state_dict() file: gradients divided by sqrt(v)+eps (LESS)")
    d = p.add_argument_group("data")
    d.add_argument("--train_data", help=".pt, .npz, .csv, .jsonl, an image folder (class per sub-folder) or a datasets.save_to_disk folder")
    d.add_argument("--num_train", type=int, default=None, help="use the first N rows only (default: all)")
    add_classes_argument(d, build=True)
    add_data_arguments(d)
    s = p.add_argument_group("sketch and store")
    s.add_argument("--store", help="HDF5 store to write or extend (e.g. out/store.h5); the run spec goes beside it")
    s.add_argument("--projector", choices=PROJECTORS, default="sjlt")
    s.add_argument("--m", type=int, default=1024, help="sketch size (ignored by the identity projector)")
    s.add_argument("--seed", type=int, default=0, help="projector seed (and the seed of --random_init weights)")
    s.add_argument("--modules", nargs="+", default=None,
                   help="modules to attribute through: all (default), last:N (the last N), kinds (linear conv embedding norm "
                        "lora), glob patterns (*.mlp.*), module names, last_blocks:N[:PATTERN]")
    s.add_argument("--storage_dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    s.add_argument("--max_rows", type=int, default=None, help="stop after about this many new rows (run again to resume)")
    s.add_argument("--max_seconds", type=float, default=None, help="stop after this much time (run again to resume)")
    s.add_argument("--overwrite", action="store_true", help="discard an existing store's rows written with other settings")
    add_runtime_arguments(p)


def add_data_arguments(g: Any) -> None:
    """Options for reading records and folders (build; score/select override them per file)."""
    g.add_argument("--text_column", default=None, help="text column of .csv/.jsonl/datasets files (default: text, if present)")
    g.add_argument("--label_column", default=None, help="label column/array (default: label, labels or y)")
    g.add_argument("--feature_columns", nargs="+", default=None, help="numeric feature columns (default: all but the label)")
    g.add_argument("--max_length", type=int, default=None, help="truncate tokenized texts to this many tokens")
    g.add_argument("--image_size", type=int, default=None, help="image folders: resize + centre-crop to this size (default 224)")
    g.add_argument("--split", default=None, help="split of a datasets.save_to_disk DatasetDict")


def init_seed(args: argparse.Namespace) -> int | None:
    """The seed of random initial weights (``--random_init``), None with trained ones; a
    module:function model with neither ``--checkpoint`` nor ``--random_init`` is refused."""
    if is_hf_folder(args.model):
        if args.random_init:
            raise CommandError(f"--random_init is for module:function models; the Hugging Face folder {args.model} holds its "
                               "own weights")
        return None
    if args.checkpoint and args.random_init:
        raise CommandError("give --checkpoint (trained weights) or --random_init (initial weights), not both")
    if not args.checkpoint and not args.random_init:
        raise CommandError(f"--model {args.model} has no weights given: pass --checkpoint model.pt (a state dict, "
                           "torch.save(model.state_dict(), path)), or --random_init to attribute its seeded initial weights "
                           "on purpose")
    return args.seed if args.random_init else None


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The run spec of this build's flags (paths absolute)."""
    data = {"text_column": args.text_column, "label_column": args.label_column, "feature_columns": args.feature_columns,
            "max_length": args.max_length, "image_size": args.image_size or 224, "split": args.split,
            "classes": check_classes(args.classes)}
    for flag in ("num_train", "max_length", "image_size"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise CommandError(f"--{flag} must be >= 1, got {v}")
    return RunSpec(
        model=model_reference(args.model), task=args.task, train_data=str(Path(args.train_data).resolve()),
        store=str(Path(args.store).resolve()), model_args=parse_kwargs(args.model_args, "--model_args"),
        checkpoint=absolute(args.checkpoint), init_seed=init_seed(args), tokenizer=absolute(args.tokenizer), projector=args.projector,
        m=None if args.projector == "identity" else args.m, seed=args.seed, modules=args.modules,
        batch_size=args.batch_size or 64, dtype=args.dtype, storage_dtype=args.storage_dtype, num_train=args.num_train,
        optimizer_state=absolute(args.optimizer_state), data=data,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Featurize the training rows still missing from the store; write the run spec."""
    require(args, REQUIRED, "build")
    t0 = time.perf_counter()
    spec = spec_from_args(args)
    device = resolve_device(args.device)
    r = open_run(spec, device, progress=not args.no_progress)
    spec.model_file, spec.model_path = model_origin(spec.model)
    train = r.load_train()
    n = len(train) if spec.num_train is None else min(spec.num_train, len(train))
    spec.data["classes"], spec.data["classes_source"] = train.classes, classes_source(args.classes, train)
    if spec.label_kind() == "class":
        print(label_line(train.classes, spec.data["classes_source"], train.labels, Path(spec.train_data).name))
    weights = "" if spec.init_seed is None else f" [random initial weights: --random_init, seed {spec.init_seed}]"
    print(quality_line(r, train, n, "--train_data") + weights)
    r.resolve_modules(train)
    store_path = Path(spec.store)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    store = DiskStore(store_path, storage_dtype=spec.storage_dtype if not store_path.exists() or args.overwrite else None)
    before = len(store) if store.metadata is not None else 0
    t_load = time.perf_counter()
    r.featurizer.featurize(train.dataset, store=store, indices=np.arange(n), overwrite=args.overwrite,
                           max_rows=args.max_rows, max_seconds=args.max_seconds)
    done = r.featurizer.last_run
    spec.n_rows, spec.complete = len(store), done.complete
    path = spec_path(store_path)
    spec.save(path)
    sel = r.featurizer.selection()
    total = time.perf_counter() - t0
    print(f"model: {spec.model} ({sel.total:,} attributed parameters in {len(sel.names)} modules), device {device}")
    print(f"train data: {spec.train_data} ({train.source}, {n} of {len(train)} rows)")
    state = "complete" if done.complete else f"{done.remaining} rows still missing: run the same command again to resume"
    print(f"wrote {done.rows} new rows ({before} were already there) in {done.seconds:.1f}s -> {store_path} "
          f"[{len(store)} rows x m={store.dim}, {spec.projector}]; {state}")
    print(f"wrote run spec {path}; total {total:.1f}s (loading {t_load - t0:.1f}s)")
    return {"store": str(store_path), "spec": str(path), "rows_written": done.rows, "rows_before": before,
            "rows_total": len(store), "remaining": done.remaining, "seconds": total, "modules": list(sel.names)}
