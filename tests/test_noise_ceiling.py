"""lds_noise_ceiling against the model it assumes: outputs = expectation + independent seed noise.

On synthetic outputs with a known expectation mu and known noise per query, the ceiling it reads from
two replicates must equal the Spearman correlation of mu itself with an R-seed average (what a perfect
attribution would score), for R = 1, 2, 4."""
from __future__ import annotations

import numpy as np
import pytest

from sketchattr.validate import lds, lds_noise_ceiling
from sketchattr.validate.lds import _spearman_columns


def _outputs(rng, mu, sigma, n_seeds):
    """An n_seeds-average of noisy retrainings: [K, Q]."""
    return mu + sigma * rng.standard_normal((n_seeds, *mu.shape)).mean(0)


@pytest.mark.parametrize("n_seeds", [1, 2, 4])
def test_ceiling_equals_the_expectations_own_rank_correlation(n_seeds):
    rng = np.random.default_rng(0)
    k, q = 4000, 12
    mu = rng.standard_normal((k, q))
    sigma = np.linspace(0.3, 3.0, q)  # reliabilities from 0.92 down to 0.1
    ceiling = lds_noise_ceiling(_outputs(rng, mu, sigma, 1), _outputs(rng, mu, sigma, 1), n_seeds)
    truth = _spearman_columns(mu, _outputs(rng, mu, sigma, n_seeds))  # a perfect predictor's LDS per query
    np.testing.assert_allclose(ceiling.per_query, truth, atol=0.04)
    assert abs(ceiling.mean - truth.mean()) < 0.015
    assert ceiling.pooled >= ceiling.mean - 1e-12  # square root is concave


def test_ceiling_bounds_an_additive_datamodel():
    """Outputs exactly linear in the mask plus noise: the true weights' LDS sits at the ceiling, and no
    scores beat it by more than sampling error."""
    rng = np.random.default_rng(1)
    k, n, q = 3000, 40, 8
    masks = rng.random((k, n)) < 0.5
    w = rng.standard_normal((q, n))
    mu = masks @ w.T
    sigma = 2.0 * mu.std(0)
    y, a, b = (_outputs(rng, mu, sigma, r) for r in (2, 1, 1))
    ceiling = lds_noise_ceiling(a, b, n_seeds=2)
    exact = lds(w, masks, y).mean
    assert abs(exact - ceiling.mean) < 0.03
    assert lds(w + 0.5 * rng.standard_normal(w.shape), masks, y).mean < ceiling.mean + 0.02


def test_bad_input_is_named():
    a = np.zeros((10, 3))
    with pytest.raises(ValueError, match="one shape"):
        lds_noise_ceiling(a, np.zeros((10, 4)), 2)
    with pytest.raises(ValueError, match="at least 1"):
        lds_noise_ceiling(a, a + 1, 0)
    with pytest.raises(ValueError, match="constant"):
        lds_noise_ceiling(a, a, 2)
    with pytest.raises(ValueError, match="at least 3 subsets"):
        lds_noise_ceiling(np.ones((2, 3)), np.ones((2, 3)), 2)
