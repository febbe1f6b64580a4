"""The run spec: what ``sketchattr build`` used (model and where its code lives, weights or the
seed of random ones, task, data options with the label mapping, projector, modules), saved as
JSON beside the store (``store.h5`` -> ``store.run.json``), so ``score`` and ``select`` rebuild
the same model and featurizer from the store path alone, from any working directory.

:func:`open_run` turns a spec into the live objects (:class:`Run`: model on the device, task,
tokenizer, featurizer) and reads data files with the spec's data options.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sketchattr.cli.config import CommandError
from sketchattr.cli.labels import resolve_classes
from sketchattr.cli.model_loading import is_hf_folder, load_model, load_tokenizer, model_origin
from sketchattr.data.local_files import DataError, DataOptions, LocalData, load_local_data
from sketchattr.featurize import Featurizer
from sketchattr.featurize.preconditioner import AdamPreconditioner
from sketchattr.featurize.selection import last_blocks
from sketchattr.store import DiskStore, StoreMismatchError
from sketchattr.task import CausalLMTask, ClassificationTask, RegressionTask, SequenceClassificationTask

TASKS = ("classification", "regression", "causal_lm", "sequence_classification")
PROJECTORS = ("sjlt", "gaussian", "rademacher", "identity")
DTYPES = ("float32", "float64", "bfloat16", "float16")
SPEC_SUFFIX = ".run.json"
SPEC_FORMAT = "sketchattr-run-spec"


@dataclass
class RunSpec:
    """Everything needed to rebuild the featurizer of a store. Paths are absolute.

    ``model_file`` / ``model_path``: the file of ``model``'s code and the sys.path folder its
    import path resolved from at build; ``init_seed``: the torch seed of ``--random_init``
    weights (None: weights from ``checkpoint`` or a Hugging Face folder). ``data``: the data
    options, with ``classes`` (label names in class-id order, or None for integer labels) and
    ``classes_source``."""
    model: str
    task: str
    train_data: str
    store: str
    model_args: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    model_file: str | None = None
    model_path: str | None = None
    init_seed: int | None = None
    tokenizer: str | None = None
    projector: str = "sjlt"
    m: int | None = 1024
    seed: int = 0
    modules: list[str] | None = None
    batch_size: int = 64
    dtype: str | None = None
    storage_dtype: str = "float32"
    num_train: int | None = None
    optimizer_state: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    n_rows: int = 0
    complete: bool = False

    def data_options(self, **override: Any) -> DataOptions:
        """The data options of the build (``override``: e.g. another ``split`` for queries)."""
        opts = {**self.data, **{k: v for k, v in override.items() if v is not None}}
        return DataOptions(**{f.name: opts[f.name] for f in fields(DataOptions) if f.name in opts})

    def label_kind(self) -> str | None:
        return label_kind(self.task)

    def save(self, path: Path) -> None:
        """Write the spec as JSON (built aside and renamed: never half-written)."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"format": SPEC_FORMAT, "written": time.strftime("%Y-%m-%d %H:%M:%S"), **asdict(self)}, indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: "str | Path") -> "RunSpec":
        p = Path(path)
        if not p.is_file():
            raise CommandError(f"run spec not found: {p} (`sketchattr build` writes it beside the store; pass --run_spec "
                               "if it was moved)")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise CommandError(f"run spec {p} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != SPEC_FORMAT:
            raise CommandError(f"{p} is not a sketchattr run spec")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def spec_path(store: "str | Path") -> Path:
    """``dir/store.h5`` -> ``dir/store.run.json``."""
    p = Path(store)
    return p.with_name(p.stem + SPEC_SUFFIX)


def absolute(path: str | None) -> str | None:
    """An existing file/folder as an absolute path (other values, e.g. import paths, as given)."""
    if path is None:
        return None
    return str(Path(path).resolve()) if Path(path).exists() else path


def model_reference(model: str) -> str:
    """``--model`` with its folder or ``.py`` file made absolute (import paths as given)."""
    if is_hf_folder(model):
        return str(Path(model).resolve())
    mod, sep, fn = model.partition(":")
    if mod.endswith(".py") and Path(mod).is_file():
        return f"{Path(mod).resolve()}{sep}{fn}"
    return model


def label_kind(task: str) -> str | None:
    """``"class"``, ``"float"`` or None (causal LM: no labels)."""
    return {"classification": "class", "sequence_classification": "class", "regression": "float"}.get(task)


def make_task(name: str) -> Any:
    """The :mod:`sketchattr.task` class for ``--task``."""
    tasks = {"classification": ClassificationTask, "sequence_classification": SequenceClassificationTask,
             "regression": RegressionTask, "causal_lm": CausalLMTask}
    if name not in tasks:
        raise CommandError(f"--task {name!r}: use one of {', '.join(TASKS)}")
    return tasks[name]()


def parse_modules(items: "list[str] | str | None") -> Any:
    """``--modules``: nothing / ``all`` (every module), ``last:N`` (the last N in forward order),
    kinds (``linear``, ``conv``, ``embedding``, ``norm``, ``lora``), glob patterns, module names
    (``2`` is the module named "2"), ``last_blocks:N`` or ``last_blocks:N:PATTERN``."""
    if items is None:
        return None
    items = [items] if isinstance(items, str) else [str(i) for i in items]
    if not items or items == ["all"]:
        return None
    out: list[Any] = []
    for item in items:
        head, _, rest = item.partition(":")
        if head in ("last", "last_blocks") and rest:
            n, _, pattern = rest.partition(":")
            if not n.isdigit() or int(n) < 1 or (head == "last" and pattern):
                raise CommandError(f"--modules {item!r}: write last:N or last_blocks:N[:PATTERN] with N >= 1")
            if head == "last":
                if len(items) != 1:
                    raise CommandError(f"--modules {item!r}: last:N cannot be combined with other selections")
                return int(n)
            out.append(last_blocks(int(n), *([pattern] if pattern else [])))
        else:
            out.append(item)
    return out


@dataclass
class Run:
    """A spec made live: ``model`` (eval, on ``device``), ``task``, ``tokenizer`` (or None),
    ``featurizer``; :meth:`load` reads data files with the spec's options."""
    spec: RunSpec
    model: nn.Module
    task: Any
    tokenizer: Any
    featurizer: Any
    device: torch.device
    _train: LocalData | None = field(default=None, repr=False)

    def load(self, path: str, what: str, **override: Any) -> LocalData:
        """A data file as :class:`LocalData` (labels per the task; class names of the build)."""
        try:
            return load_local_data(path, self.spec.label_kind(), self.spec.data_options(**override), self.tokenizer)
        except DataError as exc:
            raise CommandError(f"{what}: {exc}") from exc

    def load_query(self, path: str, what: str, **override: Any) -> LocalData:
        """A later file (query, target) read with the store's label mapping; string labels the
        mapping lacks are refused instead of being numbered anew."""
        return self.load(path, what, new_classes=False, **override)

    def load_train(self) -> LocalData:
        """The training file of the build (read once per run)."""
        if self._train is None:
            self._train = self.load(self.spec.train_data, "--train_data")
        return self._train

    def use_collate(self, data: LocalData) -> None:
        """Batch ``data`` with its own collate function (PadCollator for token sequences)."""
        self.featurizer.collate_fn = data.collate_fn

    def resolve_modules(self, data: LocalData) -> None:
        """Resolve the module selection on the first row of ``data`` (last-N is traced there, as in build)."""
        self.use_collate(data)
        try:
            self.featurizer.plan_rows(data.dataset, indices=[0])
        except (ValueError, TypeError) as exc:
            raise CommandError(f"--modules {self.spec.modules}: {exc}") from exc


def open_run(spec: RunSpec, device: torch.device, batch_size: int | None = None, progress: bool = True) -> Run:
    """Load the model (checkpoint, device, dtype), task, tokenizer and build the featurizer."""
    task = make_task(spec.task)
    model = load_model(spec.model, spec.model_args, spec.checkpoint, spec.task, spec.init_seed, spec.model_path)
    _note_moved_code(spec)
    dtype = getattr(torch, spec.dtype) if spec.dtype else None
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    tokenizer = load_tokenizer(spec.tokenizer, spec.model)
    preconditioner = None
    if spec.optimizer_state:
        preconditioner = _adam_preconditioner(spec.optimizer_state, model)
    if spec.projector not in PROJECTORS:
        raise CommandError(f"--projector {spec.projector!r}: use one of {', '.join(PROJECTORS)}")
    m = None if spec.projector == "identity" else spec.m
    if m is not None and m < 1:
        raise CommandError(f"--m must be >= 1, got {m}")
    bs = int(batch_size or spec.batch_size)
    if bs < 1:
        raise CommandError(f"--batch_size must be >= 1, got {bs}")
    featurizer = Featurizer(model, task, modules=parse_modules(spec.modules), projector=spec.projector, m=m, seed=spec.seed,
                            batch_size=bs, device=device, dtype=dtype, progress=progress, preconditioner=preconditioner)
    return Run(spec, model, task, tokenizer, featurizer, device)


def _note_moved_code(spec: RunSpec) -> None:
    """Warn when ``--model``'s code now comes from another file than at build."""
    now = model_origin(spec.model)[0]
    if spec.model_file and now and Path(now) != Path(spec.model_file):
        print(f"warning: --model {spec.model} was imported from {now}, but the store was built with {spec.model_file}",
              file=sys.stderr)


def _adam_preconditioner(path: str, model: nn.Module) -> Any:
    """``--optimizer_state``: an Adam/AdamW ``optimizer.state_dict()`` (or a checkpoint dict
    holding one under ``optimizer``), read with weights_only=True."""
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"--optimizer_state not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CommandError(f"cannot read --optimizer_state {p} with torch.load(weights_only=True): {str(exc).splitlines()[0]}") from exc
    if isinstance(state, dict) and isinstance(state.get("optimizer"), dict):
        state = state["optimizer"]
    try:
        return AdamPreconditioner.from_state_dict(state, model)
    except (ValueError, KeyError, TypeError) as exc:
        raise CommandError(f"--optimizer_state {p}: {exc}") from exc


def _weights_hint(spec: RunSpec) -> str:
    """Why a rebuilt model may differ from the build's."""
    if spec.checkpoint is None and spec.init_seed is None and not is_hf_folder(spec.model):
        return "its build had no --checkpoint: random weights differ on every load; rebuild with --checkpoint or --random_init"
    return "was the checkpoint or model code changed since build?"


def add_store_arguments(p: Any) -> None:
    """``--store`` and ``--run_spec`` (score, select)."""
    p.add_argument("--store", help="the store written by `sketchattr build` (its run spec is read from beside it)")
    p.add_argument("--run_spec", default=None, help="the run spec, if not beside the store (<store stem>.run.json)")


def open_store(store: str, run_spec: str | None, device: torch.device, batch_size: int | None,
               progress: bool, classes: list[str] | None = None) -> tuple[Run, Any]:
    """The run of a built store and the store itself (read-only use), checked against each other.
    ``classes``: ``--classes`` of this command (see :func:`~sketchattr.cli.labels.resolve_classes`)."""
    path = Path(store)
    if not path.is_file():
        raise CommandError(f"store not found: {path} (write it with `sketchattr build`)")
    spec = RunSpec.load(run_spec or spec_path(path))
    spec.store = str(path.resolve())  # where the store is now (its folder may have moved since build)
    spec.data["classes"] = resolve_classes(spec.data, classes)
    r = open_run(spec, device, batch_size, progress)
    disk = DiskStore(path)
    if disk.metadata is None or len(disk) == 0:
        raise CommandError(f"the store {path} holds no rows: run `sketchattr build` (again) to fill it")
    r.resolve_modules(r.load_train())
    try:
        disk.metadata.check_matches(r.featurizer.metadata("train"))
    except StoreMismatchError as exc:
        raise CommandError(f"the store {path} does not match the model of its run spec {run_spec or spec_path(path)} "
                           f"({_weights_hint(spec)}): {exc}") from exc
    if not spec.complete:
        print(f"note: the store holds {len(disk)} rows and its build did not finish: scores cover those rows only "
              "(run `sketchattr build` again to complete it)")
    return r, disk
