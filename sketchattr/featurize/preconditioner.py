"""Optimizer-aware gradients: Adam's second moments as a diagonal preconditioner (LESS, TrackStar).

``AdamPreconditioner`` scales each per-example gradient elementwise by ``1 / (sqrt(v) + eps)``,
``v`` being Adam(W)'s ``exp_avg_sq`` for the parameter, before the projection. LESS
(Xia et al. 2024) preconditions the training gradients only and scores with cosine similarity
against plain target gradients; TrackStar (Chang et al. 2024) corrects both sides
(``queries=True``). The featurizer applies it to the exact gradients of the hook engine (or of the
vmap fallback); a factorized projector cannot take it (the scaling is not a Kronecker product).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["AdamPreconditioner"]


class AdamPreconditioner:
    """Elementwise ``g / (sqrt(v) + eps)`` per parameter.

    exp_avg_sq: ``{parameter name: v}`` (the names of ``model.named_parameters()``); every
        attributed parameter needs one. eps: Adam's epsilon (default 1e-8). queries: also
        precondition query gradients (TrackStar); default False (LESS: train side only).
    """

    def __init__(self, exp_avg_sq: dict[str, torch.Tensor], eps: float = 1e-8, queries: bool = False) -> None:
        if not exp_avg_sq:
            raise ValueError("exp_avg_sq is empty: no optimizer state to precondition with")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
        bad = [n for n, v in exp_avg_sq.items() if not torch.is_tensor(v) or bool((v < 0).any()) or not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"exp_avg_sq must hold finite, non-negative tensors; not so for {bad[:5]}")
        self.exp_avg_sq = {n: v.detach() for n, v in exp_avg_sq.items()}
        self.eps = float(eps)
        self.queries = bool(queries)
        self._scales: dict[Any, torch.Tensor] = {}

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, model: nn.Module, eps: float | None = None,
                       queries: bool = False) -> "AdamPreconditioner":
        """From a live Adam/AdamW optimizer over ``model``'s parameters (eps: the optimizer's by default)."""
        names = {id(p): n for n, p in model.named_parameters()}
        state, found_eps = {}, None
        for group in optimizer.param_groups:
            found_eps = group.get("eps", found_eps)
            for p in group["params"]:
                v = optimizer.state.get(p, {}).get("exp_avg_sq")
                if v is not None and id(p) in names:
                    state[names[id(p)]] = v
        if not state:
            raise ValueError("the optimizer holds no exp_avg_sq: is it Adam/AdamW, and has it taken a step?")
        return cls(state, eps if eps is not None else (found_eps or 1e-8), queries)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any], model: nn.Module, param_names: Sequence[str] | None = None,
                        eps: float | None = None, queries: bool = False) -> "AdamPreconditioner":
        """From ``optimizer.state_dict()`` (e.g. a checkpoint loaded with ``weights_only=True``).
        Its states are numbered in the order of the optimizer's parameters: ``param_names`` gives
        their names (default: ``model``'s trainable parameters in ``named_parameters`` order)."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be an optimizer.state_dict() with 'state' and 'param_groups'")
        order = [i for g in state_dict["param_groups"] for i in g["params"]]
        names = list(param_names) if param_names is not None else [n for n, p in model.named_parameters() if p.requires_grad]
        if len(names) != len(order):
            raise ValueError(f"the optimizer has {len(order)} parameters but {len(names)} names were given: pass "
                             "param_names in the order the optimizer was built with")
        state = {n: state_dict["state"][i]["exp_avg_sq"] for n, i in zip(names, order)
                 if i in state_dict["state"] and "exp_avg_sq" in state_dict["state"][i]}
        if not state:
            raise ValueError("the optimizer state holds no exp_avg_sq: is it Adam/AdamW, and has it taken a step?")
        found_eps = state_dict["param_groups"][0].get("eps", 1e-8)
        return cls(state, eps if eps is not None else found_eps, queries)

    def applies_to(self, kind: str) -> bool:
        return kind == "train" or self.queries

    def scale(self, param_names: Sequence[str], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``1 / (sqrt(v) + eps)`` of a block's parameters, flattened and concatenated: ``[d]``."""
        key = (tuple(param_names), dtype, str(device))
        if key not in self._scales:
            missing = [n for n in param_names if n not in self.exp_avg_sq]
            if missing:
                raise ValueError(f"no exp_avg_sq for {missing[:5]}: the optimizer did not train these parameters")
            v = torch.cat([self.exp_avg_sq[n].reshape(-1).to(torch.float64) for n in param_names])
            self._scales[key] = (1.0 / (v.sqrt() + self.eps)).to(device=device, dtype=dtype)
        return self._scales[key]

    def spec(self) -> dict[str, Any]:
        """JSON-able identity (store metadata): eps, sides, a hash of the moments."""
        h = hashlib.sha256()
        for name in sorted(self.exp_avg_sq):
            h.update(name.encode())
            h.update(self.exp_avg_sq[name].detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
        return {"type": "adam", "eps": self.eps, "queries": self.queries, "moments": h.hexdigest()[:16]}
