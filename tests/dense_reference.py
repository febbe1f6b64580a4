"""Dense reference computations: explicit per-example autograd loops and torch.linalg."""
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev


def per_example_grads(model, fn, xs, ys, param_names=None):
    """[n, d] matrix of per-example gradients of fn(logits_i [1,C], y_i [1]) by a Python loop."""
    params = [p for n, p in model.named_parameters() if param_names is None or n in param_names]
    rows = []
    for x, y in zip(xs, ys):
        model.zero_grad()
        out = fn(model(x.unsqueeze(0)), y.unsqueeze(0))
        gs = torch.autograd.grad(out, params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def ce_loss(logits, y):
    return F.cross_entropy(logits, y, reduction="sum")


def margin_fn(logits, y):
    correct = logits[0, y[0]]
    others = torch.cat([logits[0, : y[0]], logits[0, y[0] + 1 :]])
    return correct - torch.logsumexp(others, dim=0)


def dense_influence(q, g, lam):
    """−Q (F + λI)⁻¹ Gᵀ with F = GᵀG/n, by an explicit solve. [n_query, n_train]"""
    n, d = g.shape
    f = g.T @ g / n
    return -(torch.linalg.solve(f + lam * torch.eye(d, dtype=g.dtype), q.T)).T @ g.T


def layout_permutation(layout):
    """Flat (featurizer) position -> row-major index of the layout's matrix, written out: a bias
    column puts the weight first then the bias, a matrix with the bias as its last column
    interleaves them."""
    if getattr(layout, "bias", None) == "col":
        r, c = layout.rows, layout.cols
        idx = [o * (c + 1) + i for o in range(r) for i in range(c)] + [o * (c + 1) + c for o in range(r)]
        return torch.tensor(idx)
    return torch.arange(layout.dim)  # no bias, or a bias row: the flat block is already row-major


def dense_curvature_inverse(factors, blocks, G, damping_ratio=3e4):
    """Block-diagonal M [d, d] (featurizer order) of the fitted EKFAC/KFAC factors with
    damping "auto" (λ = max Λ / ``damping_ratio`` per module), built from explicit Kronecker
    products of the eigenbases. Checks on the way that EKFAC's Λ is mean (Q_Sᵀ G_i Q_A)² of the
    explicit per-example gradients ``G`` [n, d], and a flat block's Λ mean g²."""
    offset, mats = 0, []
    for b in blocks:
        t, dim = factors.tensors[b.name], b.dim
        g = G[:, offset : offset + dim]
        if "LS" in t:
            perm = layout_permutation(b.layout)
            qs = t.get("QS", torch.eye(b.layout.shape[0], dtype=torch.float64))
            qa = t.get("QA", torch.eye(b.layout.shape[1], dtype=torch.float64))
            if factors.kind == "ekfac":
                gi = torch.zeros_like(g)
                gi[:, perm] = g
                rot = qs.T @ gi.reshape(-1, *b.layout.shape) @ qa
                assert torch.allclose(t["Lambda"], (rot**2).mean(0), atol=1e-10), b.name
            lam = t["Lambda"] if factors.kind == "ekfac" else torch.outer(t["LS"], t["LA"])
            K = torch.kron(qs.contiguous(), qa.contiguous())
            M = K @ torch.diag(1.0 / (lam.reshape(-1) + float(lam.max()) / damping_ratio)) @ K.T
            mats.append(M[perm][:, perm])
        else:  # a flat block: diagonal Λ = mean g²
            assert torch.allclose(t["Lambda"].reshape(-1), (g**2).mean(0), atol=1e-12), b.name
            mats.append(torch.diag(1.0 / (t["Lambda"].reshape(-1) + float(t["Lambda"].max()) / damping_ratio)))
        offset += dim
    return torch.block_diag(*mats)


def dense_eigenbasis(factors, blocks):
    """Per block ``(K [d_k, d_k], Λ [d_k])``: K maps the featurizer's flat gradient to the block's EKFAC
    eigen-coordinates (``g @ K``; Q_S ⊗ Q_A written out, the identity for a flat block), Λ their eigenvalues."""
    out = []
    for b in blocks:
        t = factors.tensors[b.name]
        lam = t["Lambda"].reshape(-1)
        if "LS" in t:
            qs = t.get("QS", torch.eye(b.layout.shape[0], dtype=torch.float64))
            qa = t.get("QA", torch.eye(b.layout.shape[1], dtype=torch.float64))
            out.append((torch.kron(qs.contiguous(), qa.contiguous())[layout_permutation(b.layout)], lam))
        else:
            out.append((torch.eye(len(lam), dtype=torch.float64), lam))
    return out


def dense_spectral_matrix(factors, blocks, fn):
    """Block-diagonal ``K diag(fn(Λ)) Kᵀ`` [d, d] in featurizer order, built explicitly from the fitted
    factors (EKFAC Λ; see :func:`dense_eigenbasis`)."""
    return torch.block_diag(*[K @ torch.diag(fn(lam)) @ K.T for K, lam in dense_eigenbasis(factors, blocks)])


def dense_whitening(factors, blocks, damping_ratio=3e4):
    """``K`` [d, d] (featurizer order -> eigen coordinates, block by block) and the per-coordinate scale
    ``(Λ + λ)^(-1/2)`` [d] with λ = max Λ / ``damping_ratio`` per block ("auto"): whitened
    coordinates are ``(g @ K) * scale``."""
    bases = dense_eigenbasis(factors, blocks)
    scales = [(lam + float(lam.max()) / damping_ratio) ** -0.5 for _, lam in bases]
    return torch.block_diag(*[K for K, _ in bases]), torch.cat(scales)


def dense_ggn(model, names, params, inputs, outputs_of, hessian_of):
    """G = (1/n) Σ_i J_iᵀ H_i J_i [d, d] for the parameters ``params`` (flat, in that order), J_i by
    torch.func.jacrev of ``outputs_of(call, input_i)`` (rows of outputs [T, C]; ``call`` runs the model
    with the given parameters) and ``hessian_of(output row [C])`` [C, C] written out."""
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    G = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for inp in inputs:
        def f(t):
            values = {n: v.reshape(p.shape) for n, v, p in zip(names, t.split(sizes), params)}
            return outputs_of(lambda *a, **k: functional_call(model, values, a, k), inp)
        J, z = jacrev(f)(theta), f(theta)  # [T, C, d], [T, C]
        for t in range(J.shape[0]):
            G += J[t].T @ hessian_of(z[t]) @ J[t] / len(inputs)
    return G


def softmax_hessian(logits):
    """Hessian of cross-entropy in the logits: diag(p) − ppᵀ."""
    p = torch.softmax(logits, -1)
    return torch.diag(p) - torch.outer(p, p)
