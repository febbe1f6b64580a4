"""Dense reference computations: explicit per-example autograd loops and torch.linalg."""
import torch
import torch.nn.functional as F


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
