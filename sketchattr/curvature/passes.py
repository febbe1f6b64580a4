"""The data passes of :func:`~sketchattr.curvature.factors.fit_factors` and what each stage computes.

:class:`Run` holds what a pass needs; a pass runs the hook engine over this process's rows of the
training data, the global RNG seeded per batch (:func:`batch_seed`) so that sampled Fisher labels
are reproducible and do not depend on how batches are spread over processes. Each stage of
:data:`STAGE_FNS` (covariance, eigen, correction, diagonal) sums its statistics over a pass (the
eigen stage decomposes the covariances instead), all-reduced across a collective. The conventions
(what ``A``, ``S``, ``QA``, ``LS``, ``Lambda`` are) are in :mod:`.factors`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from sketchattr.core.batches import batch_len, first_example, tree_map
from sketchattr.core.profiler import Profiler
from sketchattr.featurize.capture import BatchCapture
from sketchattr.featurize.engine import HookEngine
from sketchattr.featurize.passes import task_mask
from sketchattr.featurize.plan import Block
from sketchattr.featurize.sharding import lockstep_batches, sharding_of
from sketchattr.task import Task

if TYPE_CHECKING:
    from sketchattr.distributed.collective import Collective


@dataclass
class Run:
    """Everything a data pass needs."""

    model: nn.Module
    task: Task
    dataset: Dataset
    n: int
    engine: HookEngine
    batch_size: int
    dtype: torch.dtype
    seed: int
    sample: bool
    progress: bool
    profiler: Profiler
    collective: "Collective | None" = None
    collate_fn: Callable[[list], Any] | None = None

    @property
    def blocks(self) -> list[Block]:
        return self.engine.blocks

    @property
    def rows(self) -> range:
        """This process's rows of ``range(n)`` (all of them without a collective)."""
        if self.collective is None:
            return range(self.n)
        part = self.collective.shard(self.n, self.batch_size)
        return range(part.start, part.stop)


def caster(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Move a batch's tensor to the model's device, floating ones to its dtype."""
    p = next(model.parameters())

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=p.device, dtype=p.dtype if t.is_floating_point() else t.dtype)

    return cast


def pass_seed(seed: int, pass_index: int) -> int:
    """Seed of data pass ``pass_index`` (0: covariance/diagonal, 1: correction)."""
    if pass_index == 0:
        return seed
    return int(np.random.SeedSequence([seed, pass_index]).generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


def batch_seed(seed: int, pass_index: int, batch_index: int) -> int:
    """Seed of global batch ``batch_index`` of data pass ``pass_index`` (batch 0: the pass's
    seed, so a one-batch pass samples as ``torch.manual_seed(pass_seed(seed, pass_index))``)."""
    if batch_index == 0:
        return pass_seed(seed, pass_index)
    state = np.random.SeedSequence([seed, pass_index, batch_index]).generate_state(1, np.uint64)[0]
    return int(state & ((1 << 63) - 1))


def _data_pass(run: Run, desc: str, consume: Callable[[BatchCapture], None], pass_index: int = 0) -> None:
    """One pass over this process's rows of the first ``run.n`` examples: ``consume(capture)`` per
    batch (:class:`~sketchattr.featurize.capture.BatchCapture` of the training loss, the Task's mask
    applied). Seeds the global RNG per batch with ``batch_seed(run.seed, pass_index, global batch
    index)`` (restored afterwards). The first batch is checked against plain autograd."""
    model, prof, task = run.model, run.profiler, run.task
    rows = run.rows
    # own generator: the DataLoader's base-seed draw must not consume the seeded global RNG
    loader = DataLoader(Subset(run.dataset, rows), batch_size=run.batch_size, shuffle=False, generator=torch.Generator(),
                        collate_fn=run.collate_fn)
    first_batch = rows.start // run.batch_size
    sharding = sharding_of(model)  # a fully_shard-ed model: every rank runs as many passes (lockstep)
    filler = next(iter(DataLoader(Subset(run.dataset, [rows.start if len(rows) else 0]), batch_size=1,
                                  collate_fn=run.collate_fn))) if sharding is not None else None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cast = caster(model)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            with run.engine.attached() as engine:
                batches = tqdm(loader, desc=desc, unit="batch", disable=not run.progress)
                for b, (batch, real) in enumerate(lockstep_batches(batches, len(loader), sharding, filler)):
                    torch.manual_seed(batch_seed(run.seed, pass_index, first_batch + b))
                    batch = tree_map(cast, batch)
                    n, mask = batch_len(batch), task_mask(task, batch, device)
                    with prof.record("forward + backward"):
                        cap = engine.run(lambda: task.train_loss(model, batch, sample=run.sample), n, mask)
                    if b == 0:
                        check = engine.run(lambda: task.train_loss(model, batch), n, mask) if run.sample else cap
                        engine.verify(check, lambda: task.train_loss(model, first_example(batch)))
                    if real:  # a sharded model's filler pass (other ranks have more batches) adds nothing
                        with prof.record(f"accumulate ({desc})"):
                            consume(cap)
    finally:
        model.train(was_training)


Terms = Callable[[int, BatchCapture], dict[str, torch.Tensor]]


def _sum_over_data(run: Run, desc: str, terms: Terms, zeros: Callable[[int], dict[str, torch.Tensor]], pass_index: int = 0) -> dict:
    """{module: {name: (1/N) Σ_batches terms(k, capture)[name]}} over the blocks k that ``terms``
    returns entries for; ``zeros(k)``: the entries of a rank without rows (distributed)."""
    sums: dict[str, dict[str, torch.Tensor]] = {b.name: {} for b in run.blocks}

    def consume(cap: BatchCapture) -> None:
        for k, block in enumerate(run.blocks):
            for key, value in terms(k, cap).items():
                acc = sums[block.name]
                acc[key] = acc[key] + value if key in acc else value

    _data_pass(run, desc, consume, pass_index)
    if run.collective is not None:
        for k, block in enumerate(run.blocks):
            acc = sums[block.name]
            if not acc:  # no rows on this rank
                acc.update(zeros(k))
            for key in sorted(acc):
                acc[key] = run.collective.sum(acc[key])
    return {name: {k: v / run.n for k, v in acc.items()} for name, acc in sums.items() if acc}


def _zeros(run: Run, shape_of: Callable[[Block], dict[str, tuple[int, ...]]]) -> Callable[[int], dict[str, torch.Tensor]]:
    device = next(run.model.parameters()).device
    return lambda k: {key: torch.zeros(shape, dtype=run.dtype, device=device) for key, shape in shape_of(run.blocks[k]).items()}


def _matrices(run: Run, cap: BatchCapture, k: int) -> torch.Tensor:
    """Block k's per-example gradients as matrices ``[B, *layout.shape]`` in ``run.dtype``."""
    return run.blocks[k].layout.from_flat(cap.grads(k).to(run.dtype))


def _gram(factor: Any, diagonal: bool, dtype: torch.dtype) -> torch.Tensor:
    g = factor.to(dtype).gram()
    return torch.diag(g) if g.dim() == 1 and not diagonal else g


def _covariance_stage(run: Run, tensors: dict) -> dict:
    def terms(k: int, cap: BatchCapture) -> dict[str, torch.Tensor]:
        block = run.blocks[k]
        if not block.kronecker:
            return {"Lambda": (_matrices(run, cap, k) ** 2).sum(dim=0)}
        out: dict[str, torch.Tensor] = {}
        for row, col in cap.factors(k):
            a, s = _gram(col, False, run.dtype), _gram(row, block.diagonal_rows, run.dtype)
            out["A"] = out["A"] + a if "A" in out else a
            out["S"] = out["S"] + s if "S" in out else s
        return out

    def shapes(block: Block) -> dict[str, tuple[int, ...]]:
        if not block.kronecker:
            return {"Lambda": block.layout.shape}
        r, c = block.layout.shape
        return {"A": (c, c), "S": (r,) if block.diagonal_rows else (r, r)}

    return _sum_over_data(run, "covariance", terms, _zeros(run, shapes))


def _eigen_stage(run: Run, tensors: dict) -> dict:
    out = {}
    names = [name for name, t in tensors.items() if "A" in t]  # no A: a block without Kronecker structure (Λ done)
    bar = tqdm(names, desc="eigendecomposition", unit="module", disable=not run.progress)
    with run.profiler.record("eigendecomposition"):
        for name in bar:
            t = tensors[name]
            n = max(t[s].shape[0] for s in ("A", "S") if t[s].dim() == 2)  # eigh is O(n³) in the larger side
            bar.set_postfix_str(f"{name} ({n}×{n})", refresh=True)
            out[name] = {}
            for side in ("A", "S"):
                vals, vecs = _eigh(t[side])
                out[name]["L" + side] = vals.to(run.dtype)
                if vecs is not None:
                    out[name]["Q" + side] = vecs.to(run.dtype)
    return out


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(eigenvalues clamped at 0, eigenvectors); a 1-D (diagonal) matrix has the identity basis (None)."""
    m = matrix.to(torch.float64)
    if m.dim() == 1:
        return m.clamp(min=0), None
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vals.clamp(min=0), vecs


def rotate(mat: torch.Tensor, qs: torch.Tensor | None, qa: torch.Tensor | None) -> torch.Tensor:
    """``Q_Sᵀ G Q_A`` (an identity basis given as None is skipped): ``[B, r, c]`` -> ``[B, r, c]``."""
    if qs is not None:
        mat = qs.T @ mat
    if qa is not None:
        mat = mat @ qa
    return mat


def _correction_stage(run: Run, tensors: dict) -> dict:
    bases = {name: (t.get("QS"), t.get("QA")) for name, t in tensors.items() if "LS" in t}

    def terms(k: int, cap: BatchCapture) -> dict[str, torch.Tensor]:
        name = run.blocks[k].name
        if name not in bases:
            return {}
        qs, qa = (None if q is None else q.to(run.dtype) for q in bases[name])
        return {"Lambda": (rotate(_matrices(run, cap, k), qs, qa) ** 2).sum(dim=0)}

    shapes = lambda block: {"Lambda": block.layout.shape} if block.name in bases else {}
    return _sum_over_data(run, "correction", terms, _zeros(run, shapes), pass_index=1)


def _diagonal_stage(run: Run, tensors: dict) -> dict:
    def terms(k: int, cap: BatchCapture) -> dict[str, torch.Tensor]:
        return {"Lambda": (_matrices(run, cap, k) ** 2).sum(dim=0)}

    return _sum_over_data(run, "diagonal", terms, _zeros(run, lambda block: {"Lambda": block.layout.shape}))


STAGE_FNS: dict[str, Callable[[Run, dict], dict]] = {  # stage -> (run, tensors so far) -> its tensors
    "covariance": _covariance_stage,
    "eigen": _eigen_stage,
    "correction": _correction_stage,
    "diagonal": _diagonal_stage,
}

