"""Nearest-neighbour retrieval of top proponents and opponents: a faiss index over a gradient store.

Every scorer that can use it scores by one inner product per (query, train row)::

    scores[q, i] = u_qᵀ ĝ_i        u_q = −(F̂ + λI)⁻¹ q̂    (SketchedInfluence.precondition, negated)
                                   u_q = −P M ∇f(z_q)       (EKFAC family: prepare_queries rows, negated)

with ĝ_i the stored train row as it is (importance weights enter F̂ only, never the scores). So
the top proponents of a query are a maximum-inner-product search of u_q over the store's rows,
and its top opponents the same search with −u_q (scores negated back). :class:`InfluenceIndex`
puts the rows into a faiss index once — read block by block from the store, so a
:class:`~sketchattr.store.DiskStore` larger than memory works; faiss itself holds what its index
kind holds (all rows for ``"exact"``, ``"ivf"`` and ``"hnsw"``: n·m·4 bytes) — and then answers
``top_k`` without streaming the store again.

Kinds: ``"exact"`` (``IndexFlatIP``: the same top-k as :meth:`Scorer.top_k`, up to float32
round-off and ties), ``"ivf"`` (``IndexIVFFlat`` with the inner-product metric: k-means on a
random sample of rows, ``nlist`` lists, ``nprobe`` of them searched; approximate, exact when
``nprobe = nlist``) and ``"hnsw"`` (``IndexHNSWFlat``, inner product; approximate, ``ef_search``).

**Precision**: faiss works in float32. Rows (float16/bfloat16/float64 stores too) and the
preconditioned queries (float64 in the scorer) are cast to float32, so scores agree with the
scorer's (float32 products for float32 stores) to float32 tolerance, and near-ties may swap.

faiss is optional: ``pip install faiss-cpu`` (or the ``faiss`` extra, ``pip install
sketchattr[faiss]``). Not supported: distributed scorers (``fit(..., collective=...)``; build an
index per shard and merge the :class:`TopK` with :class:`~sketchattr.score.topk.TopKMerger`),
TracIn (a sum over checkpoint stores), per-module EKFAC scores and stores whose rows are not
coordinates of one linear sketch (``eigen_topk``: :meth:`Projector.inner` is not a dot product).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from sketchattr.project import Projector
from sketchattr.score.base import Scorer
from sketchattr.score.ekfac import CurvatureScorer
from sketchattr.score.sketched_influence import SketchedInfluence
from sketchattr.score.topk import TopK, TopKMerger
from sketchattr.store import GradientStore, StoreMetadata, StoreMismatchError
from sketchattr.store.atomic import temporary_beside

if TYPE_CHECKING:
    import faiss as faiss_module

FORMAT = "sketchattr-faiss-index"
FORMAT_VERSION = 1


def import_faiss() -> faiss_module:
    """The ``faiss`` module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "InfluenceIndex needs faiss, which is not installed: pip install faiss-cpu "
            "(or the extra: pip install 'sketchattr[faiss]'); on a GPU machine faiss-gpu works too"
        ) from exc
    return faiss


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar beside an index file: ``<path>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


class InfluenceIndex:
    """A faiss inner-product index over a fitted scorer's store: ``top_k`` by nearest-neighbour search.

    scorer: a fitted :class:`SketchedInfluence` or EKFAC-family scorer
    (:class:`~sketchattr.score.ekfac.CurvatureScorer`: EKFAC, KFAC, diagonal, identity); its store's
    rows ``[n_train, m]`` are added to the index. kind: ``"exact"``, ``"ivf"`` or ``"hnsw"``.
    nlist (ivf): number of k-means lists (default ``round(√n)``, at most n/39 so that each list
    gets ~39 training rows). nprobe (ivf): lists searched per query (default ``max(1, nlist/16)``;
    ``nprobe = nlist`` is exhaustive). train_rows (ivf): rows sampled uniformly (``seed``) from the
    store to train k-means (default ``min(n, max(64·nlist, 10,000))``). hnsw_m, ef_search (hnsw):
    graph degree and search breadth. block_rows: rows read from the store per block (default:
    the store's own choice, a memory budget for a DiskStore). progress: tqdm bars while training
    and adding.

    After construction: ``kind``, ``ntotal`` (rows indexed), ``dim`` (m), ``metadata`` (the
    store's :class:`StoreMetadata`), ``index`` (the faiss object; its ids are dataset indices).
    ``nprobe`` / ``ef_search`` can be changed between queries.
    """

    KINDS: ClassVar[tuple[str, ...]] = ("exact", "ivf", "hnsw")

    def __init__(
        self,
        scorer: Scorer,
        kind: str = "exact",
        nlist: int | None = None,
        nprobe: int | None = None,
        train_rows: int | None = None,
        hnsw_m: int = 32,
        ef_search: int = 128,
        block_rows: int | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        store = _check_scorer(scorer)
        faiss = import_faiss()
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        for name, value in (("nlist", nlist), ("nprobe", nprobe), ("train_rows", train_rows), ("block_rows", block_rows)):
            if value is not None:
                _check_positive_int(name, value)
        _check_positive_int("hnsw_m", hnsw_m)
        _check_positive_int("ef_search", ef_search)
        n, m = len(store), store.dim
        self.scorer, self.kind = scorer, kind
        self.metadata: StoreMetadata = store.metadata
        self._fingerprint = indices_fingerprint(store.indices)
        self.params: dict[str, Any] = {}
        if kind == "exact":
            index = faiss.IndexIDMap(faiss.IndexFlatIP(m))
        elif kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(m, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efSearch = ef_search
            index = faiss.IndexIDMap(hnsw)
            self.params = {"hnsw_m": hnsw_m}
        else:
            nlist = nlist or int(np.clip(round(np.sqrt(n)), 1, max(1, n // 39)))
            if nlist > n:
                raise ValueError(f"nlist must be at most the store's {n} rows, got {nlist}")
            train_rows = min(n, train_rows or max(64 * nlist, 10_000))
            if train_rows < nlist:
                raise ValueError(f"train_rows must be at least nlist = {nlist} (k-means needs a row per list), got {train_rows}")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(m), m, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(_sample_rows(store, train_rows, seed, block_rows, progress))
            self.params = {"nlist": nlist, "train_rows": train_rows, "seed": seed}
        self.index = index
        added = tqdm(total=n, unit="rows", desc=f"faiss {kind}: add", disable=not progress)
        with added:
            for idx, rows in store.iter_blocks(block_rows):
                index.add_with_ids(_as_float32(rows), np.ascontiguousarray(idx, dtype=np.int64))
                added.update(len(idx))
        if index.ntotal != n:
            raise RuntimeError(f"the store listed {n} rows but its blocks held {index.ntotal}")
        if kind == "ivf":
            self.nprobe = nprobe or max(1, self.params["nlist"] // 16)
        if kind == "hnsw":
            self.ef_search = ef_search

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        """Rows in the index (the store's n_train)."""
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        """Row width m."""
        return int(self.index.d)

    @property
    def nprobe(self) -> int:
        """IVF lists searched per query (``"ivf"`` only)."""
        return int(self._ivf().nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        ivf = self._ivf()
        _check_positive_int("nprobe", value)
        if value > ivf.nlist:
            raise ValueError(f"nprobe must be at most nlist = {ivf.nlist}, got {value}")
        ivf.nprobe = int(value)

    @property
    def ef_search(self) -> int:
        """HNSW search breadth (``"hnsw"`` only)."""
        return int(self._hnsw().hnsw.efSearch)

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        _check_positive_int("ef_search", value)
        self._hnsw().hnsw.efSearch = int(value)

    # ------------------------------------------------------------------ queries
    def query_vectors(self, queries: Any, **kwargs: Any) -> torch.Tensor:
        """u ``[n_query, m]`` with ``scores[q, i] = u[q] · ĝ_i`` (in the scorer's dtype).

        queries: sketched query rows ``[n_query, m]`` for :class:`SketchedInfluence` (kwargs:
        ``damping``, any λ the fit allows); a dataset or :class:`PreparedQueries` for the EKFAC
        family (kwargs: ``kind``, ``"query"`` or ``"train"``)."""
        scorer = self.scorer
        _check_scorer(scorer)
        if scorer.store.metadata != self.metadata or indices_fingerprint(scorer.store.indices) != self._fingerprint:
            raise StoreMismatchError("the scorer was fitted again on another store since this index was built: "
                                     "build a new InfluenceIndex (or refit on the indexed store)")
        if isinstance(scorer, SketchedInfluence):
            unknown = set(kwargs) - {"damping"}
            if unknown:
                raise TypeError(f"SketchedInfluence queries take damping= only, got {sorted(unknown)}")
            return -scorer.precondition(queries, kwargs.get("damping"))
        unknown = set(kwargs) - {"kind"}
        if unknown:
            raise TypeError(f"{type(scorer).__name__} queries take kind= only (top_k ranks total scores), got {sorted(unknown)}")
        prepared = scorer.prepare_queries(queries, kwargs.get("kind", "query"))  # checks a PreparedQueries' provenance
        if prepared.per_module:
            raise ValueError("InfluenceIndex ranks total scores: prepare the queries with per_module=False")
        return -prepared.rows

    def top_k(self, queries: Any, k: int = 10, **kwargs: Any) -> TopK:
        """Top-k proponents (highest scores, descending) and opponents (lowest, ascending) of each
        query by dataset index: :class:`TopK` with arrays ``[n_query, k]`` (scores float32).

        queries and kwargs as for :meth:`query_vectors`. With ``kind="exact"`` the result equals
        ``scorer.top_k(queries, k)`` up to float32 round-off; ``"ivf"``/``"hnsw"`` may miss rows."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be an int in [1, {self.ntotal}] (the indexed rows), got {k!r}")
        u = _as_float32(self.query_vectors(queries, **kwargs))
        if u.ndim != 2 or u.shape[1] != self.dim:
            raise ValueError(f"query vectors must be [n_query, {self.dim}], got {tuple(u.shape)}")
        nq = u.shape[0]
        scores, ids = self.index.search(np.concatenate([u, -u]), int(k))  # one batch: proponents, then opponents
        missing = np.nonzero((ids < 0).any(axis=1))[0]
        if len(missing):
            hint = f"raise nprobe (now {self.nprobe} of {self._ivf().nlist})" if self.kind == "ivf" else "raise ef_search"
            raise ValueError(f"the {self.kind} search found fewer than k={k} rows for query {int(missing[0]) % nq}: {hint}")
        merger = TopKMerger(int(k))  # the library's TopK form, as Scorer.top_k returns it
        merger.add(TopK(proponents=torch.from_numpy(ids[:nq]), proponent_scores=torch.from_numpy(scores[:nq]),
                        opponents=torch.from_numpy(ids[nq:]), opponent_scores=torch.from_numpy(-scores[nq:])))
        return merger.result()

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the faiss index to ``path`` (faiss's own format) and ``<path>.json`` beside it (the
        store's metadata, row count and index fingerprint, kind, parameters). Both are written under
        temporary names and renamed. Returns ``path``."""
        faiss = import_faiss()
        path = Path(path)
        info = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind, "params": self.params,
            "n_rows": self.ntotal, "dim": self.dim, "dtype": "float32", "scorer": type(self.scorer).__name__,
            "faiss_version": getattr(faiss, "__version__", "unknown"), "indices_sha256": self._fingerprint,
            "store_metadata": json.loads(self.metadata.to_json()),
        }
        tmp = temporary_beside(path)
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)
        side = sidecar_path(path)
        tmp = temporary_beside(side)
        tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
        os.replace(tmp, side)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], scorer: Scorer) -> InfluenceIndex:
        """Read an index written by :meth:`save` for ``scorer`` (fitted on the same store). Raises
        :class:`StoreMismatchError` naming the differences when the scorer's store has other
        metadata (projector, modules, model fingerprint, task, ...) or other rows."""
        faiss = import_faiss()
        path, side = Path(path), sidecar_path(path)
        for p in (path, side):
            if not p.exists():
                raise FileNotFoundError(f"{p} does not exist (an InfluenceIndex is {path.name} plus {side.name})")
        info = json.loads(side.read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"{side} is not an InfluenceIndex sidecar (format {info.get('format')!r}, expected {FORMAT!r})")
        store = _check_scorer(scorer)
        saved = StoreMetadata.from_json(json.dumps(info["store_metadata"]))
        diff = saved.differences(store.metadata)
        if diff:
            raise StoreMismatchError(f"{path} indexes another store than the scorer's:\n  " + "\n  ".join(
                d.replace("store has", "index has").replace("requested", "scorer's store has") for d in diff))
        found = (len(store), indices_fingerprint(store.indices))
        if found != (info["n_rows"], info["indices_sha256"]):
            raise StoreMismatchError(f"{path} indexes {info['n_rows']} rows (indices sha256 {info['indices_sha256']}); "
                                     f"the scorer's store holds {found[0]} (sha256 {found[1]}): same settings, other rows")
        self = cls.__new__(cls)
        self.scorer, self.kind, self.params = scorer, info["kind"], info["params"]
        self.metadata, self._fingerprint = store.metadata, info["indices_sha256"]
        self.index = faiss.read_index(str(path))
        if (self.ntotal, self.dim) != (info["n_rows"], info["dim"]):
            raise StoreMismatchError(f"{path} holds {self.ntotal} rows of width {self.dim}; its sidecar {side} says "
                                     f"{info['n_rows']} of width {info['dim']}: the two files do not belong together")
        return self

    def __repr__(self) -> str:
        extra = {"ivf": lambda: f", nlist={self._ivf().nlist}, nprobe={self.nprobe}",
                 "hnsw": lambda: f", ef_search={self.ef_search}"}.get(self.kind, lambda: "")()
        return f"InfluenceIndex(kind={self.kind!r}, ntotal={self.ntotal}, dim={self.dim}{extra})"

    # ------------------------------------------------------------------ internals
    def _ivf(self) -> Any:
        if self.kind != "ivf":
            raise AttributeError(f"nprobe applies to kind='ivf' indexes; this one is {self.kind!r}")
        return import_faiss().extract_index_ivf(self.index)

    def _hnsw(self) -> Any:
        if self.kind != "hnsw":
            raise AttributeError(f"ef_search applies to kind='hnsw' indexes; this one is {self.kind!r}")
        return import_faiss().downcast_index(self.index.index)


def indices_fingerprint(indices: np.ndarray) -> str:
    """sha256 (first 16 hex digits) of a store's dataset indices in row order (int64)."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def _check_scorer(scorer: Scorer) -> GradientStore:
    """The fitted scorer's store, or an error saying what is expected."""
    if not isinstance(scorer, (SketchedInfluence, CurvatureScorer)):
        raise TypeError(f"InfluenceIndex supports SketchedInfluence and the EKFAC family (EKFACScorer, KFACScorer, "
                        f"DiagonalScorer, IdentityScorer); got {type(scorer).__name__}")
    if not hasattr(scorer, "train_indices") or getattr(scorer, "store", None) is None:
        raise RuntimeError(f"InfluenceIndex needs a fitted scorer: {type(scorer).__name__} is not fitted; call "
                           "scorer.fit(store) first")
    if scorer.collective is not None:
        raise ValueError("InfluenceIndex indexes one process's store: this scorer was fitted with collective= "
                         "(a shard per rank); build an index per shard and merge their TopK with TopKMerger.add")
    store = scorer.store
    if store.metadata is None or len(store) == 0:
        raise ValueError("the scorer's store holds no rows: featurize a training set first")
    if isinstance(scorer, CurvatureScorer):
        proj = scorer.featurizer.projector
        if getattr(proj, "sparse_rows", False) or type(proj).inner is not Projector.inner:
            raise ValueError(f"InfluenceIndex needs scores that are dot products of query and stored rows; the "
                             f"{proj.spec().get('type')!r} projector scores through its own inner(): use Scorer.top_k")
    return store


def _as_float32(rows: torch.Tensor) -> np.ndarray:
    """C-contiguous float32 numpy copy (or view) of rows on any device."""
    return np.ascontiguousarray(rows.detach().to(device="cpu", dtype=torch.float32).numpy())


def _sample_rows(store: GradientStore, size: int, seed: int, block_rows: int | None, progress: bool) -> np.ndarray:
    """``size`` rows drawn uniformly without replacement (seeded), read block by block: [size, m] float32."""
    n = len(store)
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    out, start = [], 0
    bar = tqdm(total=n, unit="rows", desc="faiss ivf: sample training rows", disable=not progress)
    blocks = store.iter_blocks(block_rows)
    try:
        with bar:
            for idx, rows in blocks:
                lo, hi = np.searchsorted(chosen, [start, start + len(idx)])
                if hi > lo:
                    out.append(_as_float32(rows[torch.from_numpy(chosen[lo:hi] - start)]))
                start += len(idx)
                bar.update(len(idx))
                if hi == size:  # the rest of the store holds no sampled row
                    break
    finally:
        blocks.close()  # a DiskStore's file is closed at once
    return np.concatenate(out)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
