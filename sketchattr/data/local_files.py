"""A user's own dataset from a local file or folder, as a torch Dataset the Featurizer takes.

Sources (by extension / folder layout):

* ``.pt``: ``torch.save`` of a tensor tuple ``(x, y, ...)``, a dict of tensors (``x``/``inputs``/
  ``features`` and ``y``/``labels``/``label``/``targets``, or Hugging Face ``input_ids`` [N, T]
  with ``attention_mask``, ``labels``), or one token tensor [N, T] (causal LM). Read with
  ``torch.load(weights_only=True)``: files that name code are refused.
* ``.npz``: the same arrays by name, read with ``allow_pickle=False``.
* ``.csv`` / ``.jsonl``: records. A text column (``text`` or ``--text_column``) is tokenized with
  a Hugging Face tokenizer (label column ``label`` or ``--label_column``); otherwise every column
  but the label (or ``--feature_columns``) is a numeric feature.
* a class-per-folder image folder (``root/<class>/<image>``,
  :class:`~sketchattr.data.image_folder.ImageFolderDataset`, ``--image_size`` square crops).
* a ``datasets.save_to_disk`` folder (needs the ``datasets`` package; ``--split`` for a
  DatasetDict), read as records.

Classification labels may be integers or strings. String labels (and image folders) are mapped
to class ids by ``DataOptions.classes`` (the order gives the id), or, when none is given and the
file may define the mapping (``new_classes``: the training file of a build), by their sorted
names; a file that may not (a query file against a store built from integer ids) is refused.
Integer labels are class ids (named by ``classes`` when given). Every source gives
:class:`Preview` s (text, image, label) for reports.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from sketchattr.data.collate import PadCollator
from sketchattr.data.image_folder import CenterCropTransform, ImageFolderDataset

__all__ = ["DataError", "DataOptions", "LocalData", "Preview", "load_local_data", "LABEL_KINDS"]

INPUT_KEYS = ("x", "inputs", "features")
LABEL_KEYS = ("y", "labels", "label", "targets")
RECORD_LABEL_KEYS = ("label", "labels", "y")
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")
EXTENSIONS = (".pt", ".npz", ".csv", ".jsonl")
LABEL_KINDS = ("class", "float", None)
"""``"class"``: integer class ids (classification); ``"float"``: regression targets; None: no labels (causal LM)."""


class DataError(ValueError):
    """A dataset file cannot be read as asked (missing, unknown format, absent column, ...)."""


@dataclass
class DataOptions:
    """How to read records and folders; the defaults find the usual column names."""
    text_column: str | None = None
    label_column: str | None = None
    feature_columns: list[str] | None = None
    max_length: int | None = None
    image_size: int = 224
    split: str | None = None
    classes: list[str] | None = None
    new_classes: bool = True
    """Whether string labels without ``classes`` may be numbered in sorted order (a build's training
    file); False refuses them (a query file whose store knows no class names)."""


@dataclass
class Preview:
    """What a report shows for one row: ``text``, an ``image`` ([H, W, 3] uint8) or an
    ``image_path``, and the ``label`` name."""
    text: str | None = None
    image: np.ndarray | None = None
    image_path: str | None = None
    label: str | None = None


@dataclass
class LocalData:
    """A loaded dataset: ``dataset`` (rows for the Featurizer), ``collate_fn`` (a PadCollator for
    token sequences, else None), ``labels`` [n] (None without labels), ``classes`` (label names
    when labels were strings or class folders), ``source`` (``"pt"``, ``"csv"``, ...)."""
    path: Path
    dataset: Dataset
    source: str
    collate_fn: Callable[[list], Any] | None = None
    labels: np.ndarray | None = None
    classes: list[str] | None = None
    previewer: Callable[[int], Preview] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def preview(self, i: int) -> Preview:
        """Row i as text / image for a report (its label name included)."""
        p = self.previewer(i) if self.previewer is not None else Preview(text=f"row {i}")
        if p.label is None and self.labels is not None:
            p.label = self.label_name(i)
        return p

    def label_name(self, i: int) -> str | None:
        if self.labels is None:
            return None
        v = self.labels[i]
        if self.classes is not None and np.issubdtype(np.asarray(v).dtype, np.integer) and 0 <= int(v) < len(self.classes):
            return str(self.classes[int(v)])
        return f"{v:.4g}" if np.issubdtype(np.asarray(v).dtype, np.floating) else str(v)


def load_local_data(path: "str | Path", label_kind: str | None, options: DataOptions | None = None,
                    tokenizer: Any = None) -> LocalData:
    """Read ``path`` (see the module docstring). label_kind: ``"class"``, ``"float"`` or None
    (labels not needed, e.g. causal LM). tokenizer: a Hugging Face tokenizer for text columns."""
    if label_kind not in LABEL_KINDS:
        raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {label_kind!r}")
    options = options or DataOptions()
    p = Path(path)
    if not p.exists():
        raise DataError(f"data not found: {p}")
    if p.is_dir():
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return _hf_datasets(p, label_kind, options, tokenizer)
        return _image_folder(p, label_kind, options)
    ext = p.suffix.lower()
    if ext == ".pt":
        return _arrays(p, "pt", read_pt(p), label_kind, options, tokenizer)
    if ext == ".npz":
        return _arrays(p, "npz", _read_npz(p), label_kind, options, tokenizer)
    if ext == ".csv":
        return _records(p, "csv", _read_csv(p), label_kind, options, tokenizer)
    if ext == ".jsonl":
        return _records(p, "jsonl", _read_jsonl(p), label_kind, options, tokenizer)
    raise DataError(f"{p}: unknown data extension {ext or '(none)'!r}; use {', '.join(EXTENSIONS)}, a class-per-folder "
                    "image folder, or a datasets.save_to_disk folder")


# ---------------------------------------------------------------------------- readers
def read_pt(p: Path) -> Any:
    """A .pt file by torch.load(weights_only=True): nothing in it runs; a refused or damaged file is a DataError."""
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refused or a damaged file: say which and why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read {p} with torch.load(weights_only=True), which refuses files that hold Python "
                        f"objects: save plain tensors, e.g. torch.save({{'x': x, 'y': y}}, path). torch says: {first}") from exc


def _read_npz(p: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(p, allow_pickle=False) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    except Exception as exc:  # noqa: BLE001 - object arrays (pickles) or not an npz file
        raise DataError(f"cannot read {p} as .npz of plain arrays (allow_pickle=False): {exc}") from exc


def _read_csv(p: Path) -> list[dict[str, Any]]:
    with open(p, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{p} has no data rows (a header line and at least one row are needed)")
    return rows


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p} line {n} is not JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise DataError(f"{p} line {n} must be a JSON object (one record per line), found {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise DataError(f"{p} holds no records")
    return rows


# ---------------------------------------------------------------------------- arrays (.pt, .npz)
def _arrays(p: Path, source: str, data: Any, label_kind: str | None, options: DataOptions, tokenizer: Any) -> LocalData:
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)):
        tensors = [torch.as_tensor(t) for t in data]
        if not tensors or any(t.dim() == 0 or t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise DataError(f"{p}: a tuple of tensors needs one row per example in each (shapes {[tuple(t.shape) for t in tensors]})")
        x, y = tensors[0], tensors[1] if len(tensors) > 1 else None
        rest = tensors[2:]
        return _tensor_data(p, source, x, y, rest, label_kind, options, tokenizer, f"element 1 of the tuple in {p}")
    if not isinstance(data, dict):
        raise DataError(f"{p} must hold a tensor, a tuple of tensors or a dict of tensors; found {type(data).__name__}")
    data = {str(k): torch.as_tensor(v) for k, v in data.items()}
    label_key = _pick(options.label_column, LABEL_KEYS, data, p, "label")
    if "input_ids" in data:
        return _token_arrays(p, source, data, label_key, label_kind, tokenizer)
    if options.feature_columns:
        absent = [c for c in options.feature_columns if c not in data]
        if absent:
            raise DataError(f"{p}: feature array(s) {absent} not found; it holds {sorted(data)}")
        parts = [data[c] for c in options.feature_columns]
        x = parts[0] if len(parts) == 1 else torch.cat([t.reshape(t.shape[0], -1).float() for t in parts], dim=1)
    else:
        key = next((k for k in INPUT_KEYS if k in data), None)
        if key is None:
            raise DataError(f"{p}: no input array (looked for {list(INPUT_KEYS)} or input_ids; name one with --feature_columns); "
                            f"it holds {sorted(data)}")
        x = data[key]
    y = data[label_key] if label_key is not None else None
    return _tensor_data(p, source, x, y, [], label_kind, options, tokenizer, f"array {label_key!r} of {p}")


def _pick(given: str | None, defaults: Sequence[str], keys: Any, p: Path, what: str) -> str | None:
    """The column/array named ``given`` (must exist) or the first default present (or None)."""
    if given:
        if given not in keys:
            raise DataError(f"{p}: {what} column {given!r} not found; available: {sorted(keys)}")
        return given
    return next((k for k in defaults if k in keys), None)


def _tensor_data(p: Path, source: str, x: torch.Tensor, y: torch.Tensor | None, rest: list[torch.Tensor],
                 label_kind: str | None, options: DataOptions, tokenizer: Any, where: str) -> LocalData:
    if y is not None and y.shape[0] != x.shape[0]:
        raise DataError(f"{p}: inputs have {x.shape[0]} rows and labels {y.shape[0]}; they must match")
    if x.shape[0] == 0:
        raise DataError(f"{p} holds no rows")
    if x.is_floating_point() and x.dtype != torch.float64:
        x = x.float()
    labels = None
    if label_kind is not None:
        if y is None:
            raise DataError(f"{p}: no label array found (looked for {list(LABEL_KEYS)}; name it with --label_column); "
                            "classification and regression need labels")
        y = _label_tensor(y, label_kind, where)
        labels = y.numpy()
        if label_kind == "class" and options.classes is not None:
            _check_id_range(labels, options.classes, where)
    tensors = [x] + ([y] if y is not None else []) + rest
    tokens = label_kind is None and not x.is_floating_point() and x.dim() == 2
    return LocalData(p, TensorDataset(*tensors), source, labels=labels, classes=options.classes,
                     previewer=lambda i: _tensor_preview(x[i], tokenizer if tokens else None, tokens))


def _label_tensor(y: torch.Tensor, label_kind: str, where: str) -> torch.Tensor:
    if label_kind == "float":
        return y.to(torch.float32) if y.dtype != torch.float64 else y
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise DataError(f"{where}: classification labels must be integer class ids, found non-integer values")
        y = y.long()
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise DataError(f"{where}: classification labels must be one class id per row [N], found shape {tuple(y.shape)}")
    return y.long()


def _token_arrays(p: Path, source: str, data: dict[str, torch.Tensor], label_key: str | None,
                  label_kind: str | None, tokenizer: Any) -> LocalData:
    """Pre-tokenized arrays: rows are dicts of ``input_ids`` [T], ``attention_mask``, ``labels``."""
    n = data["input_ids"].shape[0]
    cols = {k: data[k] for k in TOKEN_KEYS if k in data and k != "labels"}
    labels = None
    if label_key is not None:
        y = data[label_key]
        if label_kind is not None and y.dim() == 1:
            y = _label_tensor(y, label_kind, f"array {label_key!r} of {p}")
            labels = y.numpy()
        cols["labels"] = y
    elif label_kind is not None:
        raise DataError(f"{p}: no label array found (looked for {list(LABEL_KEYS)}; name it with --label_column)")
    bad = [k for k, v in cols.items() if v.shape[0] != n]
    if bad:
        raise DataError(f"{p}: arrays {bad} do not have input_ids' {n} rows")
    return LocalData(p, _DictRows(cols), source, labels=labels,
                     previewer=lambda i: _tensor_preview(cols["input_ids"][i], tokenizer, True))


class _DictRows(Dataset):
    """Row i = {name: column[i]} of equal-length tensors."""
    def __init__(self, cols: dict[str, torch.Tensor]) -> None:
        self.cols = cols
        self.n = next(iter(cols.values())).shape[0]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.cols.items()}


def _tensor_preview(row: torch.Tensor, tokenizer: Any, tokens: bool) -> Preview:
    """Token rows as decoded text (or ids), image-shaped rows as images, others as numbers."""
    if tokens:
        ids = row.reshape(-1).tolist()
        if tokenizer is not None:
            return Preview(text=tokenizer.decode(ids, skip_special_tokens=True))
        return Preview(text="tokens: " + " ".join(map(str, ids[:64])) + (" ..." if len(ids) > 64 else ""))
    r = row.detach().float()
    if (r.dim() == 3 and r.shape[0] in (1, 3)) or (r.dim() == 2 and min(r.shape) >= 4):
        img = r if r.dim() == 2 else r.permute(1, 2, 0)
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / (hi - lo if hi > lo else 1.0) * 255).round().to(torch.uint8).numpy()
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else (np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img)
        return Preview(image=img)
    flat = r.reshape(-1).tolist()
    return Preview(text="[" + ", ".join(f"{v:.3g}" for v in flat[:12]) + (f", ... ({len(flat)} values)]" if len(flat) > 12 else "]"))


# ---------------------------------------------------------------------------- records (.csv, .jsonl, datasets)
def _records(p: Path, source: str, rows: Sequence[dict[str, Any]], label_kind: str | None, options: DataOptions,
             tokenizer: Any) -> LocalData:
    columns = list(rows[0].keys())
    label_key = _pick(options.label_column, RECORD_LABEL_KEYS, columns, p, "label")
    if label_kind is not None and label_key is None:
        raise DataError(f"{p}: no label column (looked for {list(RECORD_LABEL_KEYS)}; name it with --label_column); "
                        f"columns: {columns}")
    labels, classes = (None, options.classes)
    if label_kind is not None:
        labels, classes = _record_labels(p, [r.get(label_key) for r in rows], label_kind, options, label_key)
    if "input_ids" in columns and not options.text_column:
        cols = {k: [torch.as_tensor(r[k]) for r in rows] for k in TOKEN_KEYS if k in columns and k != "labels"}
        return LocalData(p, _TokenRecords(cols, labels), source, collate_fn=_pad_collator(tokenizer), labels=labels,
                         classes=classes, previewer=lambda i: _tensor_preview(cols["input_ids"][i], tokenizer, True))
    text_key = _pick(options.text_column, ("text",), columns, p, "text")
    if text_key is not None:
        if tokenizer is None:
            raise DataError(f"{p} has a text column {text_key!r}: tokenizing it needs a Hugging Face tokenizer (use a "
                            "Hugging Face model folder as --model, or pass --tokenizer DIR)")
        texts = [str(r.get(text_key) if r.get(text_key) is not None else "") for r in rows]
        return LocalData(p, _TextRecords(texts, labels, tokenizer, options.max_length), source,
                         collate_fn=_pad_collator(tokenizer), labels=labels, classes=classes,
                         previewer=lambda i: Preview(text=texts[i]))
    features = options.feature_columns or [c for c in columns if c != label_key]
    absent = [c for c in features if c not in columns]
    if absent:
        raise DataError(f"{p}: feature column(s) {absent} not found; columns: {columns}")
    if not features:
        raise DataError(f"{p}: no feature columns (columns: {columns})")
    x = np.empty((len(rows), len(features)), dtype=np.float32)
    for i, r in enumerate(rows):
        for j, c in enumerate(features):
            try:
                x[i, j] = float(r.get(c))
            except (TypeError, ValueError):
                raise DataError(f"{p} row {i + 1}, column {c!r}: {r.get(c)!r} is not a number (numeric feature columns "
                                "expected; for text give --text_column and a tokenizer)") from None
    xt = torch.from_numpy(x)
    tensors = [xt] + ([torch.from_numpy(labels)] if labels is not None else [])
    return LocalData(p, TensorDataset(*tensors), source, labels=labels, classes=classes,
                     previewer=lambda i: _tensor_preview(xt[i], None, False))


def _record_labels(p: Path, values: list[Any], label_kind: str, options: DataOptions,
                   key: str) -> tuple[np.ndarray, list[str] | None]:
    """Labels [n] (int64 class ids or float32 targets) and the class names used."""
    if any(v is None or v == "" for v in values):
        row = next(i for i, v in enumerate(values) if v is None or v == "")
        raise DataError(f"{p} row {row + 1}: label column {key!r} is empty")
    if label_kind == "float":
        try:
            return np.asarray([float(v) for v in values], dtype=np.float32), options.classes
        except (TypeError, ValueError):
            raise DataError(f"{p}: regression labels in column {key!r} must be numbers") from None
    return _class_ids(values, options, f"{p}, label column {key!r}")


def _class_ids(values: list[Any], options: DataOptions, where: str) -> tuple[np.ndarray, list[str] | None]:
    """Class ids [n] of label values and the class names: names mapped by ``options.classes``
    (their order gives the id), integer values kept as ids, other names numbered in sorted order
    when ``options.new_classes`` allows it (else refused)."""
    names = [str(v) for v in values]
    ids = _integer_ids(values)
    classes = options.classes
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        if all(n in index for n in names):
            return np.asarray([index[n] for n in names], dtype=np.int64), list(classes)
        if ids is not None:
            _check_id_range(ids, classes, where)
            return ids, list(classes)
        unknown = sorted({n for n in names if n not in index})
        raise DataError(f"{where}: labels {unknown[:10]} are not among the classes {list(classes)[:20]}")
    if ids is not None:
        return ids, None
    found = sorted(set(names))
    if not options.new_classes:
        raise DataError(f"{where}: string labels {found[:10]}, but the training labels were integer class ids with no "
                        "names: give the class names in class-id order with --classes (e.g. --classes "
                        + " ".join(found[:3]) + (" ...)" if len(found) > 3 else ")"))
    index = {c: i for i, c in enumerate(found)}
    return np.asarray([index[n] for n in names], dtype=np.int64), found


def _integer_ids(values: Sequence[Any]) -> np.ndarray | None:
    """The values as int64 ids when every one is an integer number (``3``, ``"3"``, ``3.0``), else None."""
    try:
        nums = np.asarray([float(v) for v in values])
    except (TypeError, ValueError):
        return None
    return nums.astype(np.int64) if np.all(np.isfinite(nums)) and np.all(nums == np.round(nums)) else None


def _check_id_range(ids: np.ndarray, classes: Sequence[str], where: str) -> None:
    """Integer class ids must name one of ``classes`` (0 .. len - 1)."""
    bad = sorted({int(v) for v in np.asarray(ids).reshape(-1) if not 0 <= int(v) < len(classes)})
    if bad:
        raise DataError(f"{where}: class ids {bad[:10]} outside 0..{len(classes) - 1}, the ids of the {len(classes)} "
                        f"classes {list(classes)[:20]}")


def _pad_collator(tokenizer: Any) -> Any:

    pad = getattr(tokenizer, "pad_token_id", None)
    return PadCollator(pad_token_id=int(pad) if pad is not None else 0)


class _TextRecords(Dataset):
    """Texts tokenized on access: ``{"input_ids", "attention_mask", ("token_type_ids"), ("labels")}``."""
    def __init__(self, texts: list[str], labels: np.ndarray | None, tokenizer: Any, max_length: int | None) -> None:
        self.texts, self.labels, self.tokenizer, self.max_length = texts, labels, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(self.texts[i], truncation=self.max_length is not None, max_length=self.max_length)
        row = {k: torch.as_tensor(enc[k], dtype=torch.long) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        if self.labels is not None:
            row["labels"] = torch.as_tensor(self.labels[i])
        return row


class _TokenRecords(Dataset):
    """Pre-tokenized records: ``input_ids`` (and masks) per row, labels beside."""
    def __init__(self, cols: dict[str, list[torch.Tensor]], labels: np.ndarray | None) -> None:
        self.cols, self.labels = cols, labels

    def __len__(self) -> int:
        return len(self.cols["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = {k: v[i].long() for k, v in self.cols.items()}
        if self.labels is not None:
            row["labels"] = torch.as_tensor(self.labels[i])
        return row


def _hf_datasets(p: Path, label_kind: str | None, options: DataOptions, tokenizer: Any) -> LocalData:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{p} is a Hugging Face datasets folder (save_to_disk); reading it needs the datasets package: "
                        "pip install datasets") from exc
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if not options.split:
            raise DataError(f"{p} holds splits {sorted(ds)}: choose one with --split")
        if options.split not in ds:
            raise DataError(f"{p} has no split {options.split!r}; splits: {sorted(ds)}")
        ds = ds[options.split]
    if len(ds) == 0:
        raise DataError(f"{p} holds no rows")
    return _records(p, "datasets", ds.to_list(), label_kind, options, tokenizer)


# ---------------------------------------------------------------------------- image folders
def _image_folder(p: Path, label_kind: str | None, options: DataOptions) -> LocalData:

    if not any(c.is_dir() for c in p.iterdir()):
        raise DataError(f"{p} is a folder without class sub-folders: expected {p}/<class>/<image files>, or a "
                        "datasets.save_to_disk folder")
    if label_kind == "float":
        raise DataError(f"{p}: an image folder gives class labels; use --task classification")
    size = int(options.image_size)
    if options.classes is None and not options.new_classes:
        raise DataError(f"{p}: class folders name the labels, but the training labels were integer class ids with no "
                        "names: give the class names in class-id order with --classes")
    try:
        ds = ImageFolderDataset(p, transform=CenterCropTransform(resize=size, crop=size), classes=options.classes)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(str(exc)) from exc
    except ImportError as exc:
        raise DataError(f"reading the image folder {p} needs Pillow: pip install pillow") from exc
    return LocalData(p, ds, "image_folder", labels=ds.targets, classes=list(ds.classes),
                     previewer=lambda i: Preview(image_path=ds.samples[i][0]))
