"""Tests of sketchattr.project: determinism, the documented generation rules, JL moments."""
import json
import math

import numpy as np
import pytest
import torch

from sketchattr.project import (
    GaussianProjector,
    IdentityProjector,
    Projector,
    RademacherProjector,
    SJLTProjector,
    block_seed,
    make_projector,
    sjlt_cuda_available,
)

RANDOM_KINDS = ["gaussian", "rademacher", "sjlt"]


# ------------------------------------------------------------ independent reference rules
def ref_seed(seed, k, b):
    ss = np.random.SeedSequence([seed, k, b])
    return int(ss.generate_state(1, np.uint64)[0]) & (2**63 - 1)


def ref_chunks(seed, k, d, width):
    """(generator, chunk width) for each chunk of module k, as documented."""
    for b, start in enumerate(range(0, d, width)):
        yield torch.Generator(device="cpu").manual_seed(ref_seed(seed, k, b)), min(width, d - start)


def ref_dense(kind, m, seed, dims):
    cols = []
    for k, d in enumerate(dims):
        for gen, w in ref_chunks(seed, k, d, max(1, 2**20 // m)):
            if kind == "gaussian":
                chunk = torch.randn(m, w, generator=gen, dtype=torch.float32) / math.sqrt(m)
            else:
                chunk = (torch.randint(0, 2, (m, w), generator=gen) * 2 - 1).to(torch.float32)
                chunk = chunk / math.sqrt(m)
            cols.append(chunk.double())
    return torch.cat(cols, dim=1)


def ref_sjlt_draws(m, seed, c, dims):
    """Per module: (idx [d_k, c], signs [d_k, c]) by the documented rule."""
    out = []
    for k, d in enumerate(dims):
        idx, signs = [], []
        for gen, w in ref_chunks(seed, k, d, 2**16):
            idx.append(torch.randint(0, m, (w, c), generator=gen))
            signs.append((torch.randint(0, 2, (w, c), generator=gen) * 2 - 1).to(torch.int8))
        out.append((torch.cat(idx), torch.cat(signs)))
    return out


def ref_sjlt(m, seed, c, dims):
    """The sjlt formula: P[idx[j, r], j] += signs[j, r] / sqrt(c)."""
    blocks = []
    for idx, signs in ref_sjlt_draws(m, seed, c, dims):
        p = torch.zeros(m, idx.shape[0], dtype=torch.float64)
        for j in range(idx.shape[0]):
            for r in range(c):
                p[idx[j, r], j] += signs[j, r].item() / math.sqrt(c)
        blocks.append(p)
    return torch.cat(blocks, dim=1)


def grads_for(dims, batch=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=gen, dtype=dtype) for d in dims]


# ------------------------------------------------------------------------ generation rules
DENSE_M, DENSE_DIMS = 512, [3000, 7, 5000]  # chunk = 2048 columns: no d_k is a multiple


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_dense_matches_documented_rule(kind):
    proj = make_projector(kind, m=DENSE_M, seed=11)
    ref = ref_dense(kind, DENSE_M, 11, DENSE_DIMS)
    grads = grads_for(DENSE_DIMS)
    out = proj.project(grads)
    assert out.shape == (4, DENSE_M) and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.cat(grads, 1) @ ref.T, rtol=0, atol=1e-10)
    assert torch.equal(proj.matrix(DENSE_DIMS), ref)


def test_sjlt_matches_sjlt_formula_c1():
    dims = [70_000, 3, 1000]  # module 0 spans two 65536-column chunks
    proj = SJLTProjector(32, seed=5, c=1)
    draws = ref_sjlt_draws(32, 5, 1, dims)
    ref = torch.cat(
        [torch.zeros(32, i.shape[0], dtype=torch.float64).index_put_(
            (i[:, 0], torch.arange(i.shape[0])), s[:, 0].double()) for i, s in draws], dim=1)
    grads = grads_for(dims)
    torch.testing.assert_close(proj.project(grads), torch.cat(grads, 1) @ ref.T, rtol=0, atol=1e-10)
    assert torch.equal(proj.matrix(dims), ref)
    assert proj.backend_used == "torch"


def test_sjlt_matches_sjlt_formula_c3_with_loops():
    dims = [300, 41]
    proj = SJLTProjector(16, seed=2, c=3, block_size=64)
    ref = ref_sjlt(16, 2, 3, dims)  # explicit double loop, collisions add up
    grads = grads_for(dims)
    torch.testing.assert_close(proj.project(grads), torch.cat(grads, 1) @ ref.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(proj.matrix(dims), ref, rtol=0, atol=1e-15)
    assert (proj.matrix(dims) != 0).sum(0).le(3).all()


def test_block_seed_documented():
    assert block_seed(3, 1, 4) == ref_seed(3, 1, 4)
    assert 0 <= block_seed(2**40, 10**6, 10**9) < 2**63
    assert len({block_seed(0, k, b) for k in range(5) for b in range(5)}) == 25


# ------------------------------------------------------------------------------ determinism
def _small_proj(kind, seed=0, **kw):
    return make_projector(kind, m=64, seed=seed, **kw)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_seed_determinism(kind):
    grads = grads_for([500, 9, 1200])
    a = _small_proj(kind, seed=1).project(grads)
    b = _small_proj(kind, seed=1, cache_bytes=0).project(grads)
    c = _small_proj(kind, seed=2).project(grads)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_independent_of_block_size(kind):
    dims = [70_000, 5] if kind == "sjlt" else DENSE_DIMS  # steps split chunks or equal them
    m = 32 if kind == "sjlt" else DENSE_M
    grads = grads_for(dims, batch=3)
    sizes = [1000, 30_000, 200_000] if kind == "sjlt" else [7, 1000, 4096, 100_000]
    outs = [make_projector(kind, m=m, seed=4, block_size=s).project(grads) for s in sizes]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_cache_gives_identical_results_and_is_bounded(kind):
    grads = grads_for([3000, 17])
    cold = _small_proj(kind, seed=3, cache_bytes=0)
    warm = _small_proj(kind, seed=3)
    tiny = _small_proj(kind, seed=3, cache_bytes=10_000)
    first = warm.project(grads)
    assert len(warm._cache) > 0
    for proj in (cold, warm, tiny):
        assert torch.equal(proj.project(grads), first)
    assert len(cold._cache) == 0 and tiny._cache.bytes <= 10_000
    assert {key[0] for key in tiny._cache._items} <= {1}  # module 0 exceeds the cache: skipped


def test_cache_lru_is_bounded_in_bytes():
    proj = GaussianProjector(64, seed=0, cache_bytes=100 * 64 * 8)  # room for 100 columns
    for k in range(5):
        proj.project_module(torch.randn(2, 40, dtype=torch.float64), k)
        assert proj._cache.bytes <= proj.cache_bytes
    assert len(proj._cache) == 2  # the two most recent 40-column modules
    before = proj.project_module(torch.ones(2, 40, dtype=torch.float64), 0)
    proj.clear_cache()
    assert len(proj._cache) == 0
    assert torch.equal(proj.project_module(torch.ones(2, 40, dtype=torch.float64), 0), before)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_modules_are_independent_streams(kind):
    """Module k's sketch depends only on (seed, k) and its own d_k: shards agree."""
    proj = _small_proj(kind, seed=9)
    g0, g1 = grads_for([800, 300])
    full = proj.project([g0, g1])
    torch.testing.assert_close(full, proj.project_module(g0, 0) + proj.project_module(g1, 1))
    # Changing module 1 (even its size) leaves module 0's contribution untouched.
    h1 = grads_for([123], seed=7)[0]
    other = proj.project([g0, h1])
    torch.testing.assert_close(other - proj.project_module(h1, 1), proj.project_module(g0, 0))
    # A shard holding module 0 alone agrees with the full matrix's first columns.
    torch.testing.assert_close(proj.matrix([800]), proj.matrix([800, 300])[:, :800])


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_dtype_and_device_follow_input(kind):
    proj = _small_proj(kind)
    g32 = grads_for([300, 40], dtype=torch.float32)
    out32 = proj.project(g32)
    out64 = proj.project([g.double() for g in g32])
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", RANDOM_KINDS + ["identity"])
def test_empty_batch_and_empty_module(kind):
    proj = make_projector(kind, m=8)
    out = proj.project([torch.zeros(0, 5), torch.zeros(0, 3)])
    assert out.shape == (0, proj.output_dim([5, 3]))
    g = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(proj.project([g, torch.zeros(2, 0, dtype=torch.float64)]),
                               proj.project([g]))


# ------------------------------------------------------------------------ JL moments
N_SEEDS, M_JL, DIMS_JL = 200, 64, [12, 8]
# Per draw, diagonal entries of P^T P have variance 2/m (Gaussian; smaller for Rademacher /
# SJLT) and off-diagonal ones ~1/m; averaging N draws divides it by N.  6 standard
# deviations of the diagonal case bounds all 400 entries comfortably.
JL_TOL = 6 * math.sqrt(2 / (M_JL * N_SEEDS))


@pytest.mark.parametrize("kind,kw", [("gaussian", {}), ("rademacher", {}), ("sjlt", {"c": 1}),
                                     ("sjlt", {"c": 3})])
def test_expected_gram_is_identity(kind, kw):
    d = sum(DIMS_JL)
    gram = torch.zeros(d, d, dtype=torch.float64)
    for s in range(N_SEEDS):
        p = make_projector(kind, m=M_JL, seed=s, **kw).matrix(DIMS_JL)
        gram += p.T @ p
    gram /= N_SEEDS
    assert (gram - torch.eye(d, dtype=torch.float64)).abs().max() < JL_TOL


@pytest.mark.parametrize("kind,kw", [("gaussian", {}), ("rademacher", {}), ("sjlt", {"c": 1}),
                                     ("sjlt", {"c": 3})])
def test_norm_preserved_on_average(kind, kw):
    grads = grads_for(DIMS_JL, batch=1, seed=3)
    norm2 = sum(g.pow(2).sum() for g in grads)
    ratios = [make_projector(kind, m=M_JL, seed=s, **kw).project(grads).pow(2).sum() / norm2
              for s in range(N_SEEDS)]
    assert abs(torch.stack(ratios).mean().item() - 1) < JL_TOL


# ------------------------------------------------------------------- identity, spec, factory
def test_identity_projector():
    grads = grads_for([3, 5, 2])
    proj = make_projector("identity")
    assert isinstance(proj, IdentityProjector) and proj.m is None
    assert torch.equal(proj.project(grads), torch.cat(grads, 1))
    assert proj.output_dim([3, 5, 2]) == 10
    assert torch.equal(proj.matrix([3, 5, 2]), torch.eye(10, dtype=torch.float64))
    assert torch.equal(proj.project_module(grads[1], 1), grads[1])
    assert proj.spec() == {"type": "identity"}


def test_spec_and_repr():
    assert GaussianProjector(128, seed=3).spec() == {"type": "gaussian", "m": 128, "seed": 3}
    assert RademacherProjector(8).spec() == {"type": "rademacher", "m": 8, "seed": 0}
    spec = SJLTProjector(256, seed=1, block_size=77, c=2).spec()
    assert spec == {"type": "sjlt", "m": 256, "seed": 1, "c": 2}
    assert json.loads(json.dumps(spec)) == spec
    assert make_projector("sjlt", 256, seed=1, c=2, block_size=5).spec() == spec
    assert "m=256" in repr(SJLTProjector(256)) and "c=1" in repr(SJLTProjector(256))
    assert make_projector("gaussian", m=4).output_dim([10, 20]) == 4


def test_make_projector_names_and_aliases():
    assert set(Projector.registry) == {"identity", "gaussian", "rademacher", "sjlt", "factorized", "factgrass", "eigenbasis", "eigen_topk", "tensorsketch"}
    assert isinstance(make_projector("normal", m=8), GaussianProjector)
    assert isinstance(make_projector("Sparse", m=8), SJLTProjector)
    proj = RademacherProjector(8)
    assert make_projector(proj) is proj
    with pytest.raises(ValueError, match="available: eigen_topk, eigenbasis, factgrass, factorized, gaussian, identity, rademacher, sjlt, tensorsketch"):
        make_projector("countsketch", m=8)
    with pytest.raises(ValueError, match="needs a sketch dimension m"):
        make_projector("gaussian")


@pytest.mark.parametrize("kind", RANDOM_KINDS + ["identity"])
def test_bad_inputs(kind):
    proj = make_projector(kind, m=8)
    g = torch.randn(4, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="non-empty list"):
        proj.project([])
    with pytest.raises(ValueError, match="must be 2-D"):
        proj.project([torch.randn(10)])
    with pytest.raises(ValueError, match="same batch size"):
        proj.project([g, torch.randn(3, 5, dtype=torch.float64)])
    with pytest.raises(ValueError, match="floating dtype"):
        proj.project([torch.ones(4, 10, dtype=torch.int64)])
    with pytest.raises(ValueError, match="single tensor"):
        proj.project(g)
    with pytest.raises(ValueError, match="share dtype"):
        proj.project([g, g.float()])


def test_bad_constructor_arguments():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="m must be"):
            GaussianProjector(bad)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        SJLTProjector(8, block_size=0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        RademacherProjector(8, seed=-1)
    with pytest.raises(ValueError, match="c must be >= 1"):
        SJLTProjector(8, c=0)
    with pytest.raises(ValueError, match="backend"):
        SJLTProjector(8, backend="triton")


# --------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_cuda_matches_cpu(kind):
    grads = grads_for([70_000, 300])
    proj = make_projector(kind, m=64, seed=8, **({"backend": "torch"} if kind == "sjlt" else {}))
    cpu = proj.project(grads)
    gpu = proj.project([g.cuda() for g in grads])
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not sjlt_cuda_available(), reason="needs CUDA and the sjlt kernel")
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sjlt_cuda_kernel_matches_torch_path(c, dtype):
    grads = [g.cuda() for g in grads_for([70_000, 300, 5], batch=6, dtype=dtype)]
    kernel = SJLTProjector(128, seed=1, c=c)
    torch_path = SJLTProjector(128, seed=1, c=c, backend="torch")
    out_k, out_t = kernel.project(grads), torch_path.project(grads)
    assert kernel.backend_used == "sjlt-cuda" and torch_path.backend_used == "torch"
    # The kernel scales by a float32 1/sqrt(c), even for float64 inputs.
    tol = 1e-4 if dtype == torch.float32 else 1e-6
    torch.testing.assert_close(out_k, out_t, rtol=tol, atol=tol)
    cpu = torch_path.project([g.cpu() for g in grads])
    torch.testing.assert_close(out_k.cpu(), cpu, rtol=tol, atol=tol)
