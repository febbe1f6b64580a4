"""Collectives: which rows this process owns, and sums / concatenations across processes.

A :class:`Collective` is the one object the library's distributed code paths take
(``SketchedInfluence.fit(store, collective=...)``, ``fit_factors(..., collective=...)``,
:func:`sketchattr.distributed.featurize`). :class:`TorchCollective` runs on an initialised
``torch.distributed`` process group (gloo on CPU, NCCL on GPUs; e.g. under ``torchrun``);
:class:`LocalCollective` is the single-process stand-in, so the same code runs without one.
:func:`get_collective` picks between them.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from sketchattr.distributed.heartbeat import Heartbeat, RankFailedError

T = TypeVar("T")


class Collective:
    """This process's place in a job of ``world_size`` processes (world_size 1: no communication).

    Shards are contiguous and aligned to a batch size, rank 0 first, so rows concatenated in
    rank order are the single-process order and every batch has the single-process composition.
    """

    rank: int = 0
    world_size: int = 1

    def shard(self, n: int, batch_size: int = 1) -> slice:
        """This rank's rows of ``range(n)``: whole batches of ``batch_size``, split as evenly
        as possible (ranks beyond the number of batches get an empty slice)."""
        if n < 0 or batch_size < 1:
            raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        batches = -(-n // batch_size)
        lo = self.rank * batches // self.world_size
        hi = (self.rank + 1) * batches // self.world_size
        return slice(min(n, lo * batch_size), min(n, hi * batch_size))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of ``tensor`` over ranks (every rank gets it). Same shape."""
        return tensor

    def cat(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order (sizes along ``dim``
        may differ; the other dimensions must agree)."""
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's (picklable) ``obj``, in rank order."""
        return [obj]

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def activity(self, label: str) -> None:
        """Say what this rank is doing (with torch.distributed, the other ranks report it if this
        rank dies; see :mod:`sketchattr.distributed.heartbeat`)."""

    def together(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank; if it raises on any rank, every rank raises (the failing rank
        its own error, the others :class:`RankFailedError` naming it) instead of waiting for
        it at the next collective. Synchronises the ranks like a barrier."""
        error: BaseException | None = None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        failures = self.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, msg) for r, msg in enumerate(failures) if msg is not None]
        if failed:
            raise RankFailedError(f"rank {failed[0][0]} failed: {failed[0][1]}")
        return result

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that prints, joins files and writes shared outputs)."""
        return self.rank == 0


class LocalCollective(Collective):
    """One process: every shard is everything, every reduction the identity."""


class TorchCollective(Collective):
    """Collectives of a ``torch.distributed`` process group (default: the world).

    Tensors are communicated on the backend's device (CUDA for NCCL, CPU otherwise) and
    returned on the device they came from.
    """

    def __init__(self, group: Any = None, heartbeat: bool = True, stale_after: float = 10.0, on_failure: str = "exit") -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group() "
                "first (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or use "
                "LocalCollective / get_collective() for a single process"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self._device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self._heart = _heartbeat(self.rank, self.world_size, group, stale_after, on_failure) if heartbeat and self.world_size > 1 else None

    def activity(self, label: str) -> None:
        if self._heart is not None:
            self._heart.set_stage(label)

    def _run(self, action: str, fn: Any) -> Any:
        """A collective, with a dead peer reported by rank (see :mod:`sketchattr.distributed.heartbeat`)."""
        if self._heart is None:
            return fn()
        self._heart.check()
        try:
            return fn()
        except RuntimeError as exc:
            raise self._heart.explain(exc, f"{action} (doing: {self._heart.stage})") from exc

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        buf = tensor.detach().to(self._device).clone()
        self._run("all_reduce", lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group))
        return buf.to(tensor.device)

    def cat(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        t = tensor.detach().movedim(dim, 0).contiguous().to(self._device)
        sizes = self.gather_objects(t.shape[0])
        padded = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype, device=self._device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in sizes]
        self._run("all_gather", lambda: dist.all_gather(parts, padded, group=self.group))
        out = torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)
        return out.movedim(0, dim).to(tensor.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._run("all_gather_object", lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def barrier(self) -> None:
        self._run("barrier", lambda: dist.barrier(group=self.group))


def get_collective(group: Any = None, **heartbeat: Any) -> Collective:
    """A :class:`TorchCollective` when ``torch.distributed`` is initialised, else a
    :class:`LocalCollective` (so single-process code runs unchanged). ``heartbeat``:
    ``heartbeat=False``, ``stale_after=`` seconds, ``on_failure="exit"|"raise"`` (see
    :mod:`sketchattr.distributed.heartbeat`; the first collective of a process group sets them)."""
    if dist.is_available() and dist.is_initialized():
        return TorchCollective(group, **heartbeat)
    return LocalCollective()


_HEARTS: dict[Any, Any] = {}


def _heartbeat(rank: int, world_size: int, group: Any, stale_after: float, on_failure: str) -> Any:
    """One heartbeat per (process, group), shared by every collective made on it."""

    key = (id(group), world_size)
    if key not in _HEARTS:
        _HEARTS[key] = Heartbeat(rank, world_size, group, stale_after=stale_after, on_failure=on_failure)
    return _HEARTS[key]
