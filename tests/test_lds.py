import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from sketchattr.validate import GroundTruth, lds, subset_ground_truth


def _toy(seed=0, q=3, n=12, k=9):
    r = np.random.RandomState(seed)
    return r.randn(q, n), r.rand(k, n) < 0.5, r.randn(k, q)


def test_lds_matches_scipy_per_query():
    scores, masks, outputs = _toy()
    res = lds(scores, masks, outputs)
    expect = [spearmanr(masks.astype(float) @ scores[q], outputs[:, q])[0] for q in range(scores.shape[0])]
    np.testing.assert_allclose(res.per_query, expect, rtol=1e-12)
    assert res.mean == pytest.approx(np.mean(expect))


def test_lds_hand_example():
    scores = np.array([[1.0, 2.0, 4.0]])
    subsets = [np.array([0]), np.array([1]), np.array([0, 2])]  # predictions 1, 2, 5
    outputs = np.array([[0.0], [2.0], [1.0]])  # ranks 1, 3, 2 vs 1, 2, 3 -> rho = 0.5
    assert lds(scores, subsets, outputs).mean == pytest.approx(0.5)


def test_lds_perfect_and_reversed_and_torch():
    scores, masks, _ = _toy(1)
    pred = masks.astype(float) @ scores.T
    assert lds(scores, masks, pred).mean == pytest.approx(1.0)
    assert lds(scores, masks, -pred).mean == pytest.approx(-1.0)
    np.testing.assert_allclose(lds(torch.tensor(scores), torch.tensor(masks), torch.tensor(2 * pred + 1)).per_query, 1.0)


def test_lds_mask_equals_index_list():
    scores, masks, outputs = _toy(2)
    idx = [np.flatnonzero(m) for m in masks]
    np.testing.assert_array_equal(lds(scores, masks, outputs).per_query, lds(scores, idx, outputs).per_query)


def test_lds_constant_query_is_nan_and_skipped():
    scores, masks, outputs = _toy(3)
    outputs[:, 0] = 1.0
    res = lds(scores, masks, outputs)
    assert np.isnan(res.per_query[0]) and res.mean == pytest.approx(np.mean(res.per_query[1:]))


@pytest.mark.parametrize(
    "scores,subsets,outputs",
    [
        (np.zeros(5), np.zeros((4, 5), bool), np.zeros((4, 1))),  # scores not 2-D
        (np.zeros((2, 5)), np.zeros((4, 6), bool), np.zeros((4, 2))),  # mask width
        (np.zeros((2, 5)), np.zeros((4, 5), bool), np.zeros((4, 3))),  # outputs n_query
        (np.zeros((2, 5)), np.zeros((4, 5), bool), np.zeros((3, 2))),  # outputs K
        (np.zeros((2, 5)), [np.array([0, 9])], np.zeros((1, 2))),  # index out of range
        (np.zeros((2, 5)), [np.array([0.5])], np.zeros((1, 2))),  # non-integer indices
    ],
)
def test_lds_shape_errors(scores, subsets, outputs):
    with pytest.raises(ValueError):
        lds(scores, subsets, outputs)


def test_lds_error_names_shapes():
    with pytest.raises(ValueError, match=r"expected shape \[K=4, n_query=2\], found \(4, 3\)"):
        lds(np.zeros((2, 5)), np.zeros((4, 5), bool), np.zeros((4, 3)))


# ---- ground-truth harness on a fake model -----------------------------------------------------------------

N_TRAIN, N_QUERY, K, R = 10, 3, 4, 2


class Counter:
    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, positions, seed):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append(seed)
        return (np.asarray(positions), seed)


def measure(model):
    pos, seed = model
    return torch.tensor([pos.sum(), pos.min() + seed, float(len(pos))])


def run(path, train_fn, **kw):
    kw = dict(n_train=N_TRAIN, n_subsets=K, alpha=0.5, n_seeds=R, seed=0, progress=False) | kw
    return subset_ground_truth(path, train_fn, measure, **kw)


def test_ground_truth_values_and_cache(tmp_path):
    path = tmp_path / "gt.h5"
    fn = Counter()
    gt = run(path, fn)
    assert isinstance(gt, GroundTruth)
    assert gt.masks.shape == (K, N_TRAIN) and gt.masks.dtype == bool and gt.outputs.dtype == np.float64
    assert fn.calls == list(range(K * R))  # subset k uses seeds k*R + r
    for k in range(K):
        pos = np.sort(np.random.RandomState(k).choice(N_TRAIN, 5, replace=False))
        np.testing.assert_array_equal(np.flatnonzero(gt.masks[k]), pos)
        np.testing.assert_allclose(gt.outputs[k], [pos.sum(), pos.min() + k * R + 0.5, 5])
    again = Counter()
    gt2 = run(path, again)
    assert again.calls == [] and np.array_equal(gt2.outputs, gt.outputs)


def test_ground_truth_resumes(tmp_path):
    path = tmp_path / "gt.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(path, Counter(fail_after=2 * R))  # subsets 0, 1 finish, subset 2 crashes
    fn = Counter()
    gt = run(path, fn)
    assert fn.calls == list(range(2 * R, K * R))  # only subsets 2 and 3 retrained
    np.testing.assert_array_equal(gt.outputs, run(tmp_path / "fresh.h5", Counter()).outputs)


def test_ground_truth_settings_mismatch(tmp_path):
    path = tmp_path / "gt.h5"
    run(path, Counter())
    with pytest.raises(ValueError, match="other settings.*n_seeds"):
        run(path, Counter(), n_seeds=3)
    with pytest.raises(ValueError, match="other settings"):
        run(path, Counter(), attrs={"bench": "other"})


def test_ground_truth_workers_match(tmp_path):
    a = run(tmp_path / "a.h5", Counter())
    b = run(tmp_path / "b.h5", Counter(), workers=2)
    np.testing.assert_array_equal(a.outputs, b.outputs)
