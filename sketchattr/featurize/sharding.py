"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): what a featurize pass must do
differently, and the clear errors for what it cannot do.

A ``fully_shard``-ed module keeps its parameters as DTensor shards and gathers a block's weights for
its forward and backward only, as training does. The hook engine needs nothing else: a layer rule
reads the module's inputs and output gradient (activations, never weights), so per-example
gradients and Kronecker factors are exact and formed block by block. Three things change:

* **Lockstep.** Every forward and backward is a collective over the shard group (the all-gathers),
  so every rank must run the same number of passes: ranks with fewer batches run filler passes
  whose rows are dropped (:func:`lockstep_batches`).
* **Parameters in use.** Outside the forward a parameter is a shard; the engine's check against
  autograd differentiates the gathered tensors the forward really used (:mod:`.engine`).
* **Nothing global is materialised.** The model fingerprint gathers one parameter at a time
  (:func:`full_tensors`); requires-grad flags and dtypes are left as the sharded model has them.

Tensor parallelism (DTensor parameters on a mesh dimension that shards the compute, e.g. a
``Shard(1)`` weight or a parameter outside any ``fully_shard`` module) is refused: an example's
activations would be split across ranks. So is CPU offload (shards on the host, compute on the
accelerator: ``offload_policy=CPUOffloadPolicy()``), which is untested here. A model with some
blocks wrapped and others not works (the unwrapped parameters are ordinary, replicated tensors).
:func:`sharding_of` inspects a model once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ShardedModelError", "Sharding", "agreed", "check_sharded_pass", "full_tensors", "lockstep_batches", "sharding_of"]

try:  # torch.distributed may be missing from a build (then no model is sharded)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - builds without distributed support
    FSDPModule = DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


class ShardedModelError(ValueError):
    """A sharded model in a form sketchattr cannot attribute (the message names the fix)."""


@dataclass(frozen=True)
class Sharding:
    """How a model is sharded: ``group`` is the process group every pass must run in lockstep
    over (the ranks of its device mesh: the whole world)."""

    group: Any


def sharding_of(model: nn.Module) -> Sharding | None:
    """The model's FSDP2 sharding, or None when no parameter is a DTensor. Raises
    :class:`ShardedModelError` for layouts the hook engine cannot read (tensor parallel)."""
    if DTensor is None:
        return None
    sharded = [(n, p) for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if not sharded:
        return None
    fsdp_params = {id(p) for m in model.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
    outside = [n for n, p in sharded if id(p) not in fsdp_params]
    if outside:
        raise ShardedModelError(
            f"parameters {outside[:3]}{' ...' if len(outside) > 3 else ''} are DTensors outside any fully_shard module "
            "(tensor or sequence parallelism): per-example gradients need each example's whole activations on one "
            "rank. Shard the model with torch.distributed.fsdp.fully_shard only (per block and at the root)"
        )
    bad = [(n, p.placements) for n, p in sharded if any(not isinstance(pl, (Shard, Replicate)) or
                                                       (isinstance(pl, Shard) and pl.dim != 0) for pl in p.placements)]
    if bad:
        name, placements = bad[0]
        raise ShardedModelError(
            f"parameter {name!r} has placements {placements}: only fully_shard's Shard(0) (and HSDP's Replicate) "
            "are supported; tensor-parallel layouts split an example's activations across ranks"
        )
    offloaded = [n for n, p in sharded if p.device.type != p.device_mesh.device_type]
    if offloaded:
        raise ShardedModelError(
            f"parameters {offloaded[:3]} live on {sharded[0][1].device.type} but the model computes on "
            f"{sharded[0][1].device_mesh.device_type} (fully_shard's CPU offload): attribute without offload_policy "
            "(shards on the accelerator; a block's weights are gathered only while it runs)"
        )
    meshes = {id(p.device_mesh): p.device_mesh for _, p in sharded}
    ranks = sorted({int(r) for mesh in meshes.values() for r in mesh.mesh.flatten().tolist()})
    world = dist.get_world_size()
    if ranks != list(range(world)):
        raise ShardedModelError(
            f"the model's device mesh spans ranks {ranks} of a world of {world}: sketchattr runs a sharded model's "
            "passes in lockstep over the whole world; build the mesh over every rank"
        )
    return Sharding(dist.group.WORLD)


def lockstep_batches(batches: Iterable[Any], count: int, sharding: Sharding | None, filler: Any) -> Iterator[tuple[Any, bool]]:
    """``(batch, real)``: the ``count`` batches of ``batches``, then (sharded models) ``filler``
    until every rank of the shard group has run as many passes as the busiest (``real`` False:
    its rows are dropped). ``filler`` is a batch this rank can run (any real example)."""
    extra = 0
    if sharding is not None:
        most = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=sharding.group)
        extra = int(most) - count
        if extra and filler is None:
            raise ShardedModelError("this rank has no example to run the other ranks' passes with: give every rank "
                                    "at least one row of the dataset")
    for batch in batches:
        yield batch, True
    for _ in range(extra):
        yield filler, False


def full_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` with each DTensor gathered to its full value, one at a time (a collective:
    every rank of its mesh must iterate the same tensors in the same order)."""
    for name, t in tensors:
        yield name, (t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t)


def agreed(flag: bool, sharding: Sharding | None) -> bool:
    """``flag`` on any rank of the shard group (a collective when the model is sharded), so every
    rank stops a pass loop at the same pass."""
    if sharding is None:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=sharding.group)
    return bool(t)


def check_sharded_pass(model: nn.Module, selected: set[str], device: torch.device, dtype: torch.dtype) -> None:
    """What a pass over a sharded model needs: the featurizer's device and dtype are the model's (a
    sharded model is never copied), and every selected parameter requires grad (FSDP2 fixes the
    flag of a gathered weight when it first gathers it, so it is not switched for a pass)."""
    p = next(model.parameters())
    if p.dtype != dtype or p.device.type != torch.device(device).type:
        raise ShardedModelError(
            f"a fully_shard-ed model runs as it is sharded ({p.dtype} on {p.device.type}); the featurizer asked for "
            f"{dtype} on {torch.device(device).type}: cast and move the model before fully_shard, or leave the "
            "featurizer's dtype and device at their defaults"
        )
    frozen = [n for n, q in model.named_parameters() if n in selected and not q.requires_grad]
    if frozen:
        raise ShardedModelError(
            f"selected parameters {frozen[:3]}{' ...' if len(frozen) > 3 else ''} do not require grad in the sharded "
            "model: set requires_grad=True on them before fully_shard, or select other modules"
        )
