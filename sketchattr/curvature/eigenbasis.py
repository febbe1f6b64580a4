"""A sketch in the curvature's own coordinates: keep the EKFAC eigen-coordinates that carry the scores.

With fitted EKFAC (or KFAC) factors, a Kronecker block's gradient matrix G rotates into the
eigenbasis as ``R = Q_Sᵀ G Q_A`` and the influence of a training example on a query is

    −q·M·g = −Σ_blocks Σ_(j,k) R_q[j,k] R_g[j,k] / (Λ[j,k] + λ)

(blocks without Kronecker structure: the identity basis and the diagonal Λ). Over the training
set ``E[R_g[j,k]²] = Λ[j,k]`` (that is how EKFAC fits Λ), so a coordinate's term has spread about
``Λ/(Λ + λ)`` in whitened units: coordinates with Λ well below λ add little. This projector keeps
the ``m`` coordinates with the largest ``Λ/λ_b`` over all blocks (λ_b the block's damping, by
default the scorers' ``"auto"``, max(Λ_b)/3·10⁴) and stores ``R_g`` there, so

    EKFACScorer(factors, featurizer with this projector)

scores ``−Σ_kept R_q R_g / (Λ + λ)`` — exact EKFAC restricted to the kept coordinates, no random
noise, fitted once on the store and reused for any number of queries (the scorer preconditions the
query exactly and projects it with the same map: ``P M q = S D⁻¹ Kᵀ q``).

The map is ``P = S · blockdiag(Q_Sᵀ ⊗ Q_Aᵀ)`` (S: the kept rows), linear and data-dependent only
through the factors; its ``spec()`` records the factors' identity, so a store is never read with
other factors.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from sketchattr.core.capture import Capture
from sketchattr.core.kronecker import DenseFactor
from sketchattr.curvature.damping import module_damping
from sketchattr.project.base import Projector, _check_dims, _check_grads, _check_int

if TYPE_CHECKING:
    from sketchattr.curvature.factors import Factors

__all__ = ["EigenbasisProjector", "SparseEigenbasisProjector"]


class EigenbasisProjector(Projector, name="eigenbasis"):
    """Keep the ``m`` EKFAC eigen-coordinates with the largest ``Λ / λ_block``; see the module docstring.

    Args:
        m: columns kept over all blocks (at most the attributed parameters).
        factors: :class:`~sketchattr.curvature.Factors` (``"ekfac"``, or ``"kfac"``: Λ = λ_S λ_Aᵀ)
            of the same model and modules as the featurizer.
        damping: λ per block used to rank coordinates, as the scorers take it: "auto" (default,
            max(Λ)/3·10⁴ per block), None (0.1·mean(Λ) per block) or a float.
        seed: accepted for a uniform constructor; the map is deterministic.
    """

    def __init__(self, m: int, factors: "Factors", damping: "float | str | None" = "auto", seed: int = 0,
                 block_size: int = 8192) -> None:
        super().__init__(m, seed=seed, block_size=block_size)
        if factors is None or factors.kind not in ("ekfac", "kfac"):
            raise ValueError("EigenbasisProjector needs fitted EKFAC or KFAC factors (fit_factors(kind='ekfac'))")
        self.factors, self.damping = factors, damping
        self.names = list(factors.modules)
        layouts = factors.layouts
        self.layouts = [layouts[n] for n in self.names]
        ratios, self._bases, self._offsets = [], [], []

        for name in self.names:
            qs, qa, lam = factors.curvature(name, factors.kind)
            lam = lam.to(torch.float64)
            block_lambda = module_damping(lam, damping, f"module {name}")
            ratios.append((lam / block_lambda).reshape(-1))
            self._bases.append((qs, qa))
        total = sum(len(r) for r in ratios)
        self.m = _check_int("m", m, minimum=1)
        if self.m > total:
            raise ValueError(f"m={self.m} is more than the {total} coordinates of the selected blocks")
        flat = torch.cat(ratios)
        keep = torch.topk(flat, self.m).indices.sort().values
        starts = torch.tensor([0] + [len(r) for r in ratios]).cumsum(0)
        self.kept = [keep[(keep >= starts[b]) & (keep < starts[b + 1])] - starts[b] for b in range(len(ratios))]
        self.captured = float(flat[keep].div(flat[keep] + 1).sum() / flat.div(flat + 1).sum())
        """Share of the whitened energy Σ Λ/(Λ+λ) (the effective dimension) the kept coordinates hold."""
        self._cache: dict[Any, torch.Tensor] = {}

    # ------------------------------------------------------------------ binding
    def bind(self, layouts: Sequence[Any]) -> "EigenbasisProjector":
        """Check that the featurizer's blocks are the factors' blocks (same layouts, same order)."""
        layouts = list(layouts)
        if layouts != self.layouts:
            raise ValueError(f"the featurizer's blocks {layouts} are not the factors' blocks {self.layouts} "
                             f"(modules {self.names}): select the same modules for both")
        return self

    # ------------------------------------------------------------------ projection
    def output_dim(self, dims: Sequence[int]) -> int:
        _check_dims(dims)
        return self.m

    def _basis(self, b: int, side: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        q = self._bases[b][side]
        if q is None:
            return None
        key = (b, side, dtype, str(device))
        if key not in self._cache:
            self._cache[key] = q.to(device=device, dtype=dtype)
        return self._cache[key]

    def _keep_rotated(self, rot: torch.Tensor, b: int) -> torch.Tensor:
        """``[B, r, c]`` rotated matrices -> the kept coordinates ``[B, m_b]``."""
        return rot.reshape(rot.shape[0], -1).index_select(1, self.kept[b].to(rot.device))

    def _rotate(self, mat: torch.Tensor, b: int) -> torch.Tensor:
        qs, qa = self._basis(b, 0, mat.dtype, mat.device), self._basis(b, 1, mat.dtype, mat.device)
        if qs is not None:
            mat = qs.T @ mat
        if qa is not None:
            mat = mat @ qa
        return mat

    def project(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Flat per-block gradients ``[B, d_k]`` (featurizer layout) -> kept eigen-coordinates ``[B, m]``."""
        grads = _check_grads(grads)
        if len(grads) != len(self.layouts):
            raise ValueError(f"{len(grads)} blocks given, the factors have {len(self.layouts)}")
        return torch.cat([self._keep_rotated(self._rotate(lay.from_flat(g), b), b)
                          for b, (g, lay) in enumerate(zip(grads, self.layouts))], dim=1)

    def project_captured(self, capture: Capture) -> torch.Tensor:
        """From the hook engine: dense Kronecker factors are rotated first (``Σ_t (Q_Sᵀ row_t)(Q_Aᵀ col_t)ᵀ``),
        other blocks rotate their exact gradient."""
        return torch.cat(list(self._captured_parts(capture)), dim=1)

    def _captured_parts(self, capture: Capture) -> Iterator[torch.Tensor]:
        """Each block's kept coordinates ``[B, m_b]``, block by block."""
        for b, block in enumerate(capture.blocks):
            pairs = capture.factors(b) if block.kronecker else []
            if pairs and all(isinstance(r, DenseFactor) and isinstance(c, DenseFactor) for r, c in pairs):
                rot = None
                for row, col in pairs:
                    qs = self._basis(b, 0, row.values.dtype, row.values.device)
                    qa = self._basis(b, 1, col.values.dtype, col.values.device)
                    rr = row.values if qs is None else row.values @ qs
                    rc = col.values if qa is None else col.values @ qa
                    z = torch.bmm(rr.transpose(1, 2), rc)
                    rot = z if rot is None else rot + z
                yield self._keep_rotated(rot, b)
            else:
                yield self._keep_rotated(self._rotate(self.layouts[b].from_flat(capture.grads(b)), b), b)

    def project_module(self, g: torch.Tensor, module_index: int) -> torch.Tensor:
        """One block's flat gradient -> its kept coordinates ``[B, m_k]``."""
        (g,) = _check_grads([g])
        b = _check_int("module_index", module_index, minimum=0)
        return self._keep_rotated(self._rotate(self.layouts[b].from_flat(g), b), b)

    def matrix(self, dims: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Explicit ``[m, sum(dims)]`` (block-diagonal rows of ``Q_Sᵀ ⊗ Q_Aᵀ``, featurizer layout). For tests."""
        dims = _check_dims(dims)
        blocks = []
        for b, (d, lay) in enumerate(zip(dims, self.layouts)):
            r, c = lay.shape
            if d != r * c:
                raise ValueError(f"block {b}: width {d} does not match the factors' layout {lay}")
            eye = torch.eye(r * c, dtype=dtype).reshape(r * c, r, c)
            rows = self._rotate(eye, b).reshape(r * c, -1)[:, self.kept[b]].T  # [m_b, r*c]: row k = e_kᵀ rotated
            blocks.append(lay.to_flat(rows.reshape(-1, r, c)))
        return torch.block_diag(*blocks)

    def spec(self) -> dict[str, Any]:
        if "_fingerprint" not in self._cache:
            h = hashlib.sha256(json.dumps(self.factors.metadata, sort_keys=True, default=str).encode())
            for name in self.names:
                for key, t in sorted(self.factors.tensors[name].items()):
                    h.update(key.encode())
                    h.update(t.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
            self._cache["_fingerprint"] = h.hexdigest()[:16]
        return {"type": self.name, "m": self.m, "damping": self.damping, "factors": self._cache["_fingerprint"]}

    def _accumulate(self, out: torch.Tensor, g: torch.Tensor, k: int) -> None:  # pragma: no cover
        raise NotImplementedError("EigenbasisProjector overrides project() directly")

    def _module_matrix(self, d: int, k: int, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError("EigenbasisProjector overrides matrix() directly")


class SparseEigenbasisProjector(EigenbasisProjector, name="eigen_topk"):
    """Per example, the ``k = m/2`` whitened EKFAC eigen-coordinates of largest magnitude.

    A training example's whitened coordinates are ``W = (Λ + λ)^(-1/2) ⊙ Q_Sᵀ G Q_A`` over every
    block (EKFAC scores are ``−W_q · W_g``). Each example keeps its own ``k`` largest ``|W|``: the
    row is ``[values (k) | indices (k)]``, ``m = 2k`` columns, the indices' int32 bits stored in
    float32 columns (exact for any index; the store must keep float32 rows unchanged — memory, CPU
    or float32 disk stores). The query side is dense (``W_q``, every coordinate) and
    :meth:`inner` gathers it at each row's indices, so

        EKFACScorer(factors, featurizer with this projector)

    scores ``−Σ_(j in row i) W_q[j] W_i[j]``: exact EKFAC on the coordinates that carry most of each
    example's own energy, which differ from example to example — at the same number of stored
    numbers this keeps far more of EKFAC's attribution than one global set of coordinates
    (:class:`EigenbasisProjector`) or a random sketch. Rows are not a linear map of the gradient:
    only the EKFAC family reads such a store.
    """

    sparse_rows = True

    def __init__(self, m: int, factors: "Factors", damping: "float | str | None" = "auto", seed: int = 0,
                 block_size: int = 8192) -> None:
        m = _check_int("m", m, minimum=2)
        if m % 2:
            raise ValueError(f"m counts values and indices (m = 2k): it must be even, got {m}")
        total = sum(lay.dim for lay in factors.layouts.values()) if factors is not None else 0
        super().__init__(max(total, 1), factors, damping, seed, block_size)  # every coordinate, rotated
        self.k, self.m = m // 2, m
        if self.k > total:
            raise ValueError(f"k = m/2 = {self.k} is more than the {total} coordinates of the selected blocks")

        scales = []
        for name in self.names:
            _, _, lam = factors.curvature(name, factors.kind)
            lam = lam.to(torch.float64).reshape(-1)
            scales.append(lam + module_damping(lam, damping, f"module {name}"))
        self._d = torch.cat(scales)  # Λ + λ per coordinate, in block-then-row-major order
        self._starts = [0] + torch.tensor([len(x) for x in scales]).cumsum(0).tolist()

    def _whitened(self, parts: Iterator[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming top-k of ``|W|`` over blocks: (values [B, k], global indices [B, k])."""
        vals = idx = None
        for b, rot in enumerate(parts):
            d = self._d[self._starts[b] : self._starts[b + 1]].to(device=rot.device, dtype=rot.dtype)
            w = rot / d.sqrt()
            gidx = torch.arange(self._starts[b], self._starts[b + 1], device=rot.device).expand(w.shape[0], -1)
            if vals is not None:
                w, gidx = torch.cat([vals, w], dim=1), torch.cat([idx, gidx], dim=1)
            top = w.abs().topk(min(self.k, w.shape[1]), dim=1).indices
            vals, idx = w.gather(1, top), gidx.gather(1, top)
        return vals, idx

    def _encode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([vals.to(torch.float32), idx.to(torch.int32).view(torch.float32)], dim=1)

    def project(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Flat per-block gradients -> ``[B, 2k]`` (values, index bits), float32."""
        grads = _check_grads(grads)
        parts = (self._keep_rotated(self._rotate(lay.from_flat(g), b), b) for b, (g, lay) in enumerate(zip(grads, self.layouts)))
        return self._encode(*self._whitened(parts))

    def project_captured(self, capture: Capture) -> torch.Tensor:
        return self._encode(*self._whitened(self._captured_parts(capture)))

    def project_module(self, g: torch.Tensor, module_index: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError("a per-example top-k spans every block: use project()")

    def project_query(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Preconditioned query gradients ``u = M q`` -> dense ``W_q = (Λ+λ)^(1/2) ⊙ Kᵀ u`` ``[n_query, d]``
        (``= (Λ+λ)^(-1/2) ⊙ Kᵀ q``)."""
        grads = _check_grads(grads)
        rot = torch.cat([self._keep_rotated(self._rotate(lay.from_flat(g), b), b)
                         for b, (g, lay) in enumerate(zip(grads, self.layouts))], dim=1)
        return rot * self._d.to(device=rot.device, dtype=rot.dtype).sqrt()

    def inner(self, queries: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Σ_j W_q[j] · value_j`` at each row's stored indices: ``[n_query, n_rows]``. From
        :data:`SPARSE_MATMUL_QUERIES` queries on, the rows become a CSR matrix [n_rows, d] times the
        queries (4–30 × faster than gathering W_q at every index); fewer queries gather."""
        if rows.dtype != torch.float32 or rows.shape[1] != self.m:
            raise ValueError(f"eigen_topk rows are [n, {self.m}] float32 (values | index bits); got {tuple(rows.shape)} "
                             f"{rows.dtype}: was the store written in another precision?")
        vals, idx = rows[:, : self.k], rows[:, self.k :].contiguous().view(torch.int32).long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= queries.shape[1]):
            raise ValueError("eigen_topk rows hold indices outside the model's coordinates: the store changed their bits "
                             "(keep it in float32) or belongs to another model")
        dtype = dtype or torch.float64
        q = queries.to(device=rows.device, dtype=dtype)
        if q.shape[0] >= SPARSE_MATMUL_QUERIES:
            return _sparse_rows(vals, idx, q.shape[1], dtype).matmul(q.T.contiguous()).T
        out = torch.empty(q.shape[0], rows.shape[0], dtype=dtype, device=rows.device)
        step = max(1, 2**24 // max(1, q.shape[0] * self.k))
        for a in range(0, rows.shape[0], step):
            out[:, a : a + step] = (q[:, idx[a : a + step]] * vals[a : a + step].to(dtype)).sum(dim=-1)
        return out

    def matrix(self, dims: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError("a per-example top-k is not a linear map: it has no matrix")


SPARSE_MATMUL_QUERIES = 8  # from this many queries on, inner() multiplies a CSR matrix (below: the gather is cheaper)


def _sparse_rows(vals: torch.Tensor, idx: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of k (value, index) pairs [n, k] as a CSR matrix [n, dim] (indices sorted within each row,
    as CSR requires; top-k indices are distinct)."""
    idx, order = idx.sort(dim=1)
    n, k = idx.shape
    crow = torch.arange(0, n * k + 1, k, device=idx.device)
    with warnings.catch_warnings():  # CSR is "beta" in torch; the layout built here satisfies its invariants
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, idx.reshape(-1), vals.gather(1, order).reshape(-1).to(dtype), (n, dim),
                                       check_invariants=False)
