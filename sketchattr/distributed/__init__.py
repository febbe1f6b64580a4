"""sketchattr on torch.distributed (torchrun; gloo on CPU, NCCL on GPUs), no other transport.

* :func:`featurize` — each rank sketches a contiguous, batch-aligned shard of the train rows;
  per-rank HDF5 shard files joined by rank 0 into one logical store (virtual datasets).
* ``collective=`` on ``SketchedInfluence.fit`` / ``EKFACScorer.fit`` (any scorer of
  :mod:`sketchattr.score` but TracIn) and ``fit_factors``: F̂ and the EKFAC/KFAC sums are
  all-reduced; ``score`` gathers the full matrix, ``top_k`` merges the ranks' top-k,
  ``score_to_hdf5`` writes one file per rank and joins them.
* :func:`get_collective` — the world's :class:`TorchCollective`, or a :class:`LocalCollective`
  when torch.distributed is not initialised (everything then runs as one process); a dead rank
  is named by the heartbeats (:mod:`.heartbeat`).
* :func:`unwrap_model` — DistributedDataParallel models are accepted everywhere (unwrapped).

May import :mod:`sketchattr.featurize` and below; curvature and the scorers take its collectives.
"""
from sketchattr.distributed.collective import (
    Collective,
    LocalCollective,
    RankFailedError,
    TorchCollective,
    get_collective,
)
from sketchattr.distributed.featurize import featurize
from sketchattr.distributed.shards import join_scores, join_store, shard_path
from sketchattr.featurize.selection import unwrap_model

__all__ = [
    "Collective", "LocalCollective", "RankFailedError", "TorchCollective", "featurize", "get_collective",
    "join_scores", "join_store", "shard_path", "unwrap_model",
]
