"""EKFAC averaged over models: one EKFAC scorer per checkpoint (or independently trained model).

The language-model recommendation of the README: EKFAC fitted at each of a few checkpoints of one
run, each member's scores divided by their root mean square per query, then averaged
(:class:`~sketchattr.score.EnsembleInfluence` with ``normalize="rms"``). On the three LM benches it
scores 1.11 / 1.17 / 1.16 × EKFAC on the last checkpoint with 4 checkpoints, at about 4 × the time
(``benchmarks/lds_methods.py``).

>>> ens = sa.ekfac_ensemble([model_ep2, model_ep4, model_ep6, model_ep8], sa.CausalLMTask(), train,
...                         collate_fn=sa.PadCollator(), modules="linear")
>>> top = ens.top_k(queries, k=10)
>>> # narrower stores: each member's own sparse eigenbasis of m columns
>>> ens = sa.ekfac_ensemble(models, task, train, projector=lambda factors: sa.SparseEigenbasisProjector(m, factors))
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from sketchattr.curvature import Factors, fit_factors
from sketchattr.project import Projector
from sketchattr.score.checkpoints import featurize_checkpoints
from sketchattr.score.ekfac import EKFACScorer
from sketchattr.score.ensemble import EnsembleInfluence

__all__ = ["ekfac_ensemble"]


def ekfac_ensemble(
    models: Sequence[torch.nn.Module],
    task: Any,
    train_dataset: Any,
    *,
    projector: "str | Projector | Callable[[Factors], Projector]" = "identity",
    modules: Any = None,
    fisher: str = "true",
    normalize: str = "rms",
    batch_size: int = 64,
    collate_fn: Any = None,
    progress: bool = True,
    **featurize_options: Any,
) -> EnsembleInfluence:
    """A fitted :class:`~sketchattr.score.EnsembleInfluence` of one :class:`~sketchattr.score.EKFACScorer`
    per model in ``models``: factors fitted on ``train_dataset`` at each model, each its own store.

    projector: a spec for every member (default ``"identity"``: exact rows; a random sketch works but
        EKFAC warns), or a function of a member's factors returning its projector, e.g.
        ``lambda f: sa.SparseEigenbasisProjector(m, f)`` (m columns per member).
    fisher: the factors' Fisher (``"true"`` or ``"empirical"``). normalize: as EnsembleInfluence
        (``"rms"``: each member's scores per query divided by their RMS first).
    featurize_options: m, seed, sampler, store, path, device, overwrite, as
        :func:`~sketchattr.score.checkpoints.featurize_checkpoints` (disk default ``grad_cache/ekfac_ensemble.h5``,
        one group per model).
    """
    models = list(models)
    if not models:
        raise ValueError("give at least one model (checkpoints of one run, or independently trained models)")
    factors = [fit_factors(model, task, train_dataset, kind="ekfac", modules=modules, fisher=fisher, batch_size=batch_size,
                           collate_fn=collate_fn, progress=progress) for model in models]
    member_projectors = projector
    if callable(projector) and not isinstance(projector, (str, Projector)):
        member_projectors = [projector(f) for f in factors]
    featurize_options.setdefault("default_path", "grad_cache/ekfac_ensemble.h5")
    featurizers, stores = featurize_checkpoints(models, task, train_dataset, projector=member_projectors, modules=modules,
                                                batch_size=batch_size, collate_fn=collate_fn, progress=progress,
                                                **featurize_options)
    members = [EKFACScorer(f, feat) for f, feat in zip(factors, featurizers)]
    return EnsembleInfluence(members, normalize=normalize).fit(stores)
