"""Tests of sketchattr.sample: determinism, sizes, weights, unbiasedness, factories, errors."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from sketchattr.sample import (
    AllSampler,
    Sample,
    Sampler,
    StratifiedSampler,
    UniformSampler,
    WeightedSampler,
    dataset_labels,
    inclusion_probabilities,
    make_sampler,
    sample_from_spec,
    stratum_codes,
)

N = 200


def _labels(n=N, seed=0):
    y = np.random.default_rng(seed).integers(0, 6, n)
    y[17] = 99  # a stratum of size 1
    return y


def _weights(n=N, seed=0):
    w = np.random.default_rng(seed).gamma(0.7, size=n)
    w[:10] = 0.0  # never chosen
    w[10] = 60.0  # certainty row (pi capped at 1) for moderate sizes
    return w


def _build(kind, seed):
    if kind == "all":
        return AllSampler()
    if kind == "uniform":
        return UniformSampler(rate=0.13, seed=seed)
    if kind == "uniform_size":
        return UniformSampler(size=31, seed=seed)
    if kind == "stratified":
        return StratifiedSampler(_labels(), rate=0.2, seed=seed)
    if kind == "weighted":
        return WeightedSampler(_weights(), size=25, seed=seed)
    if kind == "weighted_replace":
        return WeightedSampler(_weights(), size=25, seed=seed, replace=True)
    raise AssertionError(kind)


KINDS = ["all", "uniform", "uniform_size", "stratified", "weighted", "weighted_replace"]


# ------------------------------------------------------------------------ generic
@pytest.mark.parametrize("kind", KINDS)
def test_determinism_and_index_invariants(kind):
    a, b = _build(kind, 3).sample(N), _build(kind, 3).sample(N)
    assert isinstance(a, Sample)
    assert a.indices.dtype == np.int64 and a.weights.dtype == np.float64
    assert a.indices.shape == a.weights.shape == (len(a),)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert np.all(np.diff(a.indices) > 0)  # sorted and unique
    assert a.indices[0] >= 0 and a.indices[-1] < N
    assert np.all(a.weights > 0)
    assert a.spec == b.spec and a.spec["n"] == N and a.spec["k"] == len(a)
    assert json.loads(json.dumps(a.spec)) == a.spec
    if kind != "all":
        c = _build(kind, 4).sample(N)
        assert not np.array_equal(a.indices, c.indices)
    with pytest.raises(ValueError):  # read-only arrays
        a.indices[0] = 5


def test_all_sampler():
    s = AllSampler().sample(7)
    np.testing.assert_array_equal(s.indices, np.arange(7))
    np.testing.assert_array_equal(s.weights, np.ones(7))
    assert s.spec == {"type": "all", "n": 7, "k": 7}


# ------------------------------------------------------------------------ uniform
@pytest.mark.parametrize("n,rate", [(200, 0.13), (10, 0.05), (1, 0.5), (50, 1.0), (37, 0.3)])
def test_uniform_rate(n, rate):
    s = UniformSampler(rate=rate, seed=1).sample(n)
    k = max(1, round(rate * n))
    assert len(s) == k
    np.testing.assert_allclose(s.weights, n / k, rtol=0, atol=0)
    if k == n:
        np.testing.assert_array_equal(s.indices, np.arange(n))


def test_uniform_size_and_nesting():
    s = UniformSampler(size=31, seed=5).sample(100)
    assert len(s) == 31
    np.testing.assert_array_equal(s.weights, np.full(31, 100 / 31))
    small = UniformSampler(size=10, seed=5).sample(100)
    assert set(small.indices) <= set(s.indices)  # nested for one seed
    with pytest.raises(ValueError, match="exceeds"):
        UniformSampler(size=101).sample(100)


def test_uniform_unbiased():
    x = np.random.default_rng(1).normal(size=60) + 2
    est = [UniformSampler(rate=0.2, seed=s).sample(60) for s in range(2000)]
    vals = np.array([e.estimate_total(x[e.indices]) for e in est])
    assert abs(vals.mean() - x.sum()) < 4 * vals.std(ddof=1) / np.sqrt(len(vals))


# --------------------------------------------------------------------- stratified
def test_stratified_proportions_and_weights():
    y = _labels()
    s = StratifiedSampler(y, rate=0.2, seed=0).sample(N)
    strata, sizes = np.unique(y, return_counts=True)
    assert s.spec["strata"] == len(strata)
    for lab, n_s in zip(strata, sizes):
        k_s = min(n_s, max(1, round(0.2 * n_s)))
        picked = s.indices[y[s.indices] == lab]
        assert len(picked) == k_s, lab
        np.testing.assert_allclose(s.weights[y[s.indices] == lab], n_s / k_s)
    assert 17 in s.indices  # singleton stratum always kept, weight 1
    assert s.weights[np.searchsorted(s.indices, 17)] == 1.0


def test_stratified_exact_total_when_constant_within_strata():
    y = _labels()
    per_class = np.random.default_rng(3).normal(size=100)
    x = per_class[y]
    for seed in range(5):
        s = StratifiedSampler(y, rate=0.07, seed=seed).sample(N)
        np.testing.assert_allclose(s.estimate_total(x[s.indices]), x.sum(), rtol=1e-12)


def test_stratified_key_forms_agree():
    y = _labels()
    by_array = StratifiedSampler(y, rate=0.25, seed=9).sample(N)
    by_callable = StratifiedSampler(lambda idx: y[idx], rate=0.25, seed=9).sample(N)
    by_labels = StratifiedSampler("labels", rate=0.25, seed=9).sample(N, keys=y)
    by_tensor = StratifiedSampler(torch.from_numpy(y), rate=0.25, seed=9).sample(N)
    by_strings = StratifiedSampler([f"c{v}" for v in y], rate=0.25, seed=9).sample(N)
    for other in (by_callable, by_labels, by_tensor, by_strings):
        np.testing.assert_array_equal(by_array.indices, other.indices)
        np.testing.assert_array_equal(by_array.weights, other.weights)
        assert other.spec["key_sha256"] == by_array.spec["key_sha256"]
    assert by_labels.spec["key"] == "labels" and by_callable.spec["key"] == "callable"


def test_stratified_single_stratum_equals_uniform_and_codes():
    one = StratifiedSampler(np.zeros(50), rate=0.3, seed=4).sample(50)
    uni = UniformSampler(rate=0.3, seed=4).sample(50)
    np.testing.assert_array_equal(one.indices, uni.indices)
    codes, num = stratum_codes(["b", "a", "b", "c"])
    np.testing.assert_array_equal(codes, [0, 1, 0, 2])
    assert num == 3


def test_stratified_key_errors():
    y = _labels()
    with pytest.raises(ValueError, match="length"):
        StratifiedSampler(y, rate=0.2).sample(N + 1)
    with pytest.raises(ValueError, match="keys="):
        StratifiedSampler("labels", rate=0.2).sample(N)
    with pytest.raises(ValueError, match="length"):
        StratifiedSampler("labels", rate=0.2).sample(N, keys=y[:-1])
    with pytest.raises(ValueError, match="length"):
        StratifiedSampler(lambda idx: y[:5], rate=0.2).sample(N)
    with pytest.raises(ValueError, match="own key"):
        StratifiedSampler(y, rate=0.2).sample(N, keys=y)
    with pytest.raises(ValueError, match="labels"):
        StratifiedSampler("classes", rate=0.2)
    assert StratifiedSampler("labels", rate=0.2).needs_keys
    assert not StratifiedSampler(y, rate=0.2).needs_keys


# ----------------------------------------------------------------------- weighted
@pytest.mark.parametrize("replace", [False, True])
def test_weighted_unbiased_and_zero_weights(replace):
    w = _weights()
    x = np.random.default_rng(7).normal(size=N) + np.sqrt(w)  # not proportional to w
    ests, hits = [], np.zeros(N)
    for seed in range(2000):
        s = WeightedSampler(w, size=25, seed=seed, replace=replace).sample(N)
        assert not np.any(s.indices < 10)  # zero-weight rows never chosen
        if not replace:
            assert len(s) == 25
        ests.append(s.estimate_total(x[s.indices]))
        hits[s.indices] += 1
    ests = np.array(ests)
    se = ests.std(ddof=1) / np.sqrt(len(ests))
    assert abs(ests.mean() - x.sum()) < 4 * se
    if not replace:  # empirical inclusion frequencies match pi
        pi = inclusion_probabilities(w, 25)
        assert pi[10] == 1.0 and hits[10] == 2000
        sd = np.sqrt(pi * (1 - pi) / 2000) + 1e-12
        assert np.all(np.abs(hits / 2000 - pi) < 5 * sd + 1e-9)


def test_inclusion_probabilities():
    w = np.array([100.0, 1, 1, 0, 2])
    pi = inclusion_probabilities(w, 2)
    np.testing.assert_allclose(pi, [1, 0.25, 0.25, 0, 0.5])
    assert pi.sum() == pytest.approx(2)
    s = WeightedSampler(w, size=2, seed=0).sample(5)
    assert 0 in s.indices and len(s) == 2
    # all positive rows taken -> exact total, weights 1
    s = WeightedSampler(w, size=4, seed=0).sample(5)
    np.testing.assert_array_equal(s.indices, [0, 1, 2, 4])
    np.testing.assert_allclose(s.weights, 1.0)


def test_weighted_errors():
    with pytest.raises(ValueError, match=">= 0"):
        WeightedSampler([1.0, -1.0, 2.0], size=1)
    with pytest.raises(ValueError, match="finite"):
        WeightedSampler([1.0, np.nan, 2.0], size=1)
    with pytest.raises(ValueError, match="finite"):
        WeightedSampler([1.0, np.inf], size=1)
    with pytest.raises(ValueError, match="all zero"):
        WeightedSampler([0.0, 0.0], size=1, replace=True)
    with pytest.raises(ValueError, match="positive weight"):
        WeightedSampler([1.0, 0.0, 2.0], size=3)
    WeightedSampler([1.0, 0.0, 2.0], size=3, replace=True).sample(3)  # fine with replace
    with pytest.raises(ValueError, match="length"):
        WeightedSampler([1.0, 2.0, 3.0], size=1).sample(4)
    with pytest.raises(ValueError, match="1-D"):
        WeightedSampler(np.ones((3, 2)), size=1)


# ----------------------------------------------------------------- factory / spec
def test_make_sampler_names_aliases_and_errors():
    assert isinstance(make_sampler(None), AllSampler)
    assert isinstance(make_sampler("all", seed=3), AllSampler)  # seed accepted, ignored
    assert isinstance(make_sampler("Full"), AllSampler)
    assert isinstance(make_sampler("random", rate=0.1), UniformSampler)
    assert isinstance(make_sampler("uniform", size=3, seed=2), UniformSampler)
    assert isinstance(make_sampler("stratify", key="labels", rate=0.1), StratifiedSampler)
    assert isinstance(make_sampler("pps", weights=[1, 2], size=1), WeightedSampler)
    u = UniformSampler(rate=0.5)
    assert make_sampler(u) is u
    with pytest.raises(ValueError, match="uniform"):
        make_sampler("bogus")
    with pytest.raises(ValueError, match="bad arguments"):
        make_sampler("uniform", rat=0.1)
    with pytest.raises(ValueError):
        make_sampler(u, seed=1)
    assert set(Sampler.registry) >= {"all", "uniform", "stratified", "weighted"}


@pytest.mark.parametrize("kind", KINDS)
def test_spec_round_trip(kind):
    sampler = _build(kind, 11)
    sample = sampler.sample(N)
    data = {}
    if kind.startswith("weighted"):
        data["weights"] = _weights()
    if kind == "stratified":
        data["key"] = _labels()
    again = sample_from_spec(json.loads(json.dumps(sample.spec)), **data)
    assert type(again) is type(sampler) and again.spec() == sampler.spec()
    np.testing.assert_array_equal(again.sample(N).indices, sample.indices)
    assert make_sampler(sampler.spec(), **data).spec() == sampler.spec()


def test_spec_round_trip_checks_fingerprints():
    spec = WeightedSampler(_weights(), size=5).spec()
    with pytest.raises(ValueError, match="weights="):
        sample_from_spec(spec)
    with pytest.raises(ValueError, match="sha256"):
        sample_from_spec(spec, weights=_weights() + 1)
    spec = StratifiedSampler(_labels(), rate=0.2).spec()
    with pytest.raises(ValueError, match="sha256"):
        sample_from_spec(spec, key=_labels(seed=1))
    assert isinstance(sample_from_spec({"type": "stratified", "key": "labels", "rate": 0.1,
                                        "seed": 0}), StratifiedSampler)


@pytest.mark.parametrize(
    "make",
    [
        lambda: UniformSampler(rate=0.0),
        lambda: UniformSampler(rate=1.5),
        lambda: UniformSampler(rate=float("nan")),
        lambda: UniformSampler(),
        lambda: UniformSampler(rate=0.1, size=3),
        lambda: UniformSampler(size=0),
        lambda: UniformSampler(rate=0.1, seed=-1),
        lambda: UniformSampler(rate=0.1, seed=1.5),
        lambda: StratifiedSampler(_labels(), rate=0.0),
        lambda: StratifiedSampler(5, rate=0.1),
        lambda: StratifiedSampler([], rate=0.1),
        lambda: WeightedSampler([1, 2], size=0),
    ],
)
def test_bad_constructor_arguments(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_n(n):
    with pytest.raises(ValueError, match="empty|int"):
        UniformSampler(rate=0.5).sample(n)
    with pytest.raises(ValueError):
        AllSampler().sample(n)


def test_keys_length_checked_for_all_samplers():
    with pytest.raises(ValueError, match="length"):
        UniformSampler(rate=0.5).sample(10, keys=np.zeros(9))
    s = UniformSampler(rate=0.5).sample(10, keys=np.zeros(10))  # otherwise ignored
    assert len(s) == 5


# ---------------------------------------------------------------- dataset_labels
class _TupleDS(Dataset):
    def __init__(self, y):
        self.y = y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.zeros(2), torch.tensor(self.y[i])


class _DictDS(_TupleDS):
    def __getitem__(self, i):
        return {"x": torch.zeros(2), "label": int(self.y[i])}


class _TargetsDS(_TupleDS):
    def __init__(self, y):
        super().__init__(y)
        self.targets = list(y)

    def __getitem__(self, i):
        raise AssertionError("should use .targets")


class _NoLabelDS(_TupleDS):
    def __getitem__(self, i):
        return torch.zeros(2)


def test_dataset_labels():
    y = np.array([3, 1, 4, 1, 5])
    x = torch.zeros(5, 2)
    np.testing.assert_array_equal(dataset_labels(TensorDataset(x, torch.from_numpy(y))), y)
    np.testing.assert_array_equal(dataset_labels(_TupleDS(y)), y)
    np.testing.assert_array_equal(dataset_labels(_DictDS(y)), y)
    np.testing.assert_array_equal(dataset_labels(_TargetsDS(y)), y)
    sub = Subset(TensorDataset(x, torch.from_numpy(y)), [4, 0])
    np.testing.assert_array_equal(dataset_labels(sub), [5, 3])
    with pytest.raises(ValueError, match="labels"):
        dataset_labels(_NoLabelDS(y))
    with pytest.raises(ValueError, match="labels"):
        dataset_labels(TensorDataset(x))
    s = StratifiedSampler("labels", rate=0.5, seed=0).sample(5, keys=dataset_labels(_TupleDS(y)))
    assert s.spec["strata"] == 4
