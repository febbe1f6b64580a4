"""Does a data file fit the model? Checked with forwards without gradients before any gradient:

* :func:`check_fits` runs the first rows of a file; a failure inside a layer (wrong feature
  count, image size, channels, token ids) becomes one :class:`CommandError` naming the layer,
  what it expects and what the file has, and class ids are checked against the model's outputs;
* :func:`quality_line` does the same on the training file and measures the model there
  (accuracy for classification, mean loss for regression and language models) on at most
  :data:`EVAL_ROWS` rows: what ``build`` prints, so untrained weights show at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from sketchattr.cli.config import CommandError
from sketchattr.cli.labels import mapping_text
from sketchattr.core.batches import tree_map

EVAL_ROWS = 2000
"""Rows of the training file ``build`` measures the model on."""

Frame = tuple[str, nn.Module, tuple]
"""(module name, module, positional inputs) of a module running when a forward failed."""


def batches(run: Any, data: Any, positions: Sequence[int]) -> Iterator[Any]:
    """Batches of ``data``'s rows at ``positions`` (the run's batch size and collate), on the run's device/dtype."""
    feat = run.featurizer
    cast = lambda t: t.to(feat.device, dtype=feat.dtype) if t.is_floating_point() else t.to(feat.device)
    loader = DataLoader(Subset(data.dataset, list(positions)), batch_size=feat.batch_size, collate_fn=data.collate_fn)
    for batch in loader:
        yield tree_map(cast, batch)


def checked(run: Any, fn: Callable[[], Any], batch: Any, data: Any, what: str) -> Any:
    """``fn()`` (a forward of ``run.model`` on ``batch``) without gradients; an error raised inside
    a layer is turned into one line naming the layer, what it expects and what ``what`` holds."""
    running: list[Frame] = []
    names = {m: n for n, m in run.model.named_modules()}

    def enter(mod: nn.Module, inputs: tuple) -> None:
        running.append((names[mod], mod, inputs))

    def leave(mod: nn.Module, inputs: tuple, out: Any) -> None:
        running.pop()

    handles = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    try:
        with torch.no_grad():
            return fn()
    except torch.cuda.OutOfMemoryError:
        raise  # not a mismatch: the batch is too big for the device
    except (RuntimeError, IndexError) as exc:
        raise CommandError(mismatch_message(run, running[-1] if running else None, exc, batch, data, what)) from exc
    finally:
        for h in handles:
            h.remove()


def mismatch_message(run: Any, frame: Frame | None, exc: BaseException, batch: Any, data: Any, what: str) -> str:
    """``<what> <file> does not fit the model: layer 'fc' (Linear) expects 6 input features ..., got 5 ...; its rows have ...``."""
    torch_says = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    head = f"{what} {data.path.name} does not fit the model"
    rows = f"its rows have {row_shapes(run.task.inputs(batch))}{_hint(data)}"
    if frame is None:
        return f"{head}: {torch_says}; {rows}"
    name, module, inputs = frame
    layer = f"layer {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
    x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
    sizes = None if x is None else expectation(module, x)
    if sizes is None:
        found = f" on input of shape {list(x.shape)}" if x is not None else ""
        return f"{head}: {layer} failed{found} ({torch_says}); {rows}"
    return f"{head}: {layer} expects {sizes[0]}, got {sizes[1]}; {rows}"


def expectation(module: nn.Module, x: torch.Tensor) -> tuple[str, str] | None:
    """(what a layer takes, what it got in ``x``), in words; None for layers without a fixed input size."""
    shape = f"(input of shape {list(x.shape)})"
    if isinstance(module, nn.Linear):
        return f"{module.in_features} input features (last dimension)", f"{x.shape[-1]} {shape}"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and x.dim() >= 2:
        return f"{module.in_channels} input channels (dimension 1)", f"{x.shape[1]} {shape}"
    if isinstance(module, nn.Embedding) and x.numel():
        return f"token ids below {module.num_embeddings}", f"ids up to {int(x.max())}"
    if isinstance(module, nn.LayerNorm):
        return f"last dimension(s) {list(module.normalized_shape)}", shape[1:-1]
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and x.dim() >= 2:
        return f"{module.num_features} channels (dimension 1)", f"{x.shape[1]} {shape}"
    return None


def row_shapes(inputs: Any) -> str:
    """The per-row shape of a batch's model inputs, in words."""
    if isinstance(inputs, torch.Tensor):
        return f"shape {list(inputs.shape[1:])}"
    if isinstance(inputs, dict):
        return "shapes " + ", ".join(f"{k} {list(v.shape[1:])}" for k, v in inputs.items() if isinstance(v, torch.Tensor))
    return f"inputs of type {type(inputs).__name__}"


def _hint(data: Any) -> str:
    return {"image_folder": " (--image_size sets the image size)",
            "csv": " (--feature_columns chooses the feature columns)",
            "jsonl": " (--feature_columns chooses the feature columns)"}.get(data.source, "")


def check_outputs(run: Any, out: torch.Tensor, data: Any, positions: Sequence[int], what: str) -> None:
    """Class ids (names) of the rows against the model's outputs; one regression target per output."""
    kind = run.spec.label_kind()
    if data.labels is None or kind is None or not isinstance(out, torch.Tensor) or out.dim() < 1:
        return
    what = f"{what} {data.path.name}"
    labels = np.asarray(data.labels)[np.asarray(positions, dtype=np.int64)]
    per_row = int(out[0].numel())
    if kind == "float":
        targets = int(np.prod(labels.shape[1:], dtype=np.int64))
        if per_row != targets:
            raise CommandError(f"the model outputs {per_row} values per row but {what} has {targets} regression "
                               "target(s) per row (--label_column chooses the target column)")
        return
    if out.dim() != 2 or labels.size == 0:
        return
    n_out, top = int(out.shape[1]), int(labels.max())
    classes = data.classes
    if top >= n_out or (classes is not None and len(classes) > n_out):
        found = (f"{len(classes)} classes ({mapping_text(classes)})" if classes is not None
                 else f"class ids up to {top}")
        raise CommandError(f"the model outputs {n_out} classes (ids 0..{n_out - 1}) but {what} has {found}: "
                           "check --model_args / --checkpoint, or the label column")


def check_fits(run: Any, data: Any, positions: Sequence[int], what: str, rows: int = 4) -> None:
    """Run the first ``rows`` of ``positions``: layer shapes and the rows' labels against the model."""
    first = list(positions[:rows])
    batch = next(batches(run, data, first))
    out = checked(run, lambda: run.task.forward(run.model, batch), batch, data, what)
    check_outputs(run, out, data, positions, what)


@dataclass
class Quality:
    """Sums over one pass: summed loss, correct predictions, counted rows (or tokens), classes."""

    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    classes: int = 0

    def text(self, kind: str | None, k: int, n: int) -> str:
        """The ``model quality: ...`` line (``kind``: the spec's label kind; ``k`` of ``n`` rows measured)."""
        rows = (f"on the first {k:,} of {n:,} training rows" if k < n else f"on all {n:,} training rows") + \
            " (one pass, no gradients)"
        mean = self.loss / max(self.count, 1)
        if kind is None:
            return (f"model quality: mean next-token loss {mean:.4g} (perplexity {math.exp(min(mean, 700)):.4g}) over "
                    f"{int(self.count):,} tokens {rows}")
        if kind == "float":
            return f"model quality: mean loss {mean:.4g} (1/2 squared error per row) {rows}"
        return (f"model quality: accuracy {100 * self.correct / max(self.count, 1):.1f}% (chance "
                f"{100 / max(self.classes, 1):.1f}%), mean cross-entropy {mean:.4g} {rows}")


def quality_line(run: Any, data: Any, n: int, what: str) -> str:
    """Accuracy / mean loss of the model on the first min(n, EVAL_ROWS) rows of ``data`` (one pass,
    no gradients), checking that they fit it on the way."""
    k = min(n, EVAL_ROWS)
    totals = Quality()
    for i, batch in enumerate(batches(run, data, range(k))):
        _add_batch(run, batch, data, what, totals, range(n) if i == 0 else None)
    return totals.text(run.spec.label_kind(), k, n)


def _add_batch(run: Any, batch: Any, data: Any, what: str, totals: Quality, check: Sequence[int] | None) -> None:
    """Add a batch's loss (and correct predictions) to ``totals``; ``check``: rows whose labels to
    check against the model's outputs (the first batch)."""
    kind, task = run.spec.label_kind(), run.task
    if kind is None:  # next-token loss over the counted targets (padding and -100 left out)
        logits, targets = checked(run, lambda: task.predictions(run.model, batch), batch, data, what)
        counted = targets != -100
        totals.loss += float(F.cross_entropy(logits[counted].float(), targets[counted], reduction="sum"))
        totals.count += float(counted.sum())
        return
    out = checked(run, lambda: task.forward(run.model, batch), batch, data, what)
    if check is not None:
        check_outputs(run, out, data, check, what)
    y = task.targets(batch)
    if kind == "class":
        totals.correct += float((out.argmax(1) == y).sum())
        totals.loss += float(F.cross_entropy(out.float(), y.long(), reduction="sum"))
        totals.classes = int(out.shape[1])
    else:
        totals.loss += float(0.5 * ((out.float() - y.reshape(out.shape).float()) ** 2).sum())
    totals.count += len(y)
