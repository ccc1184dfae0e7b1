"""The statistics behind ldm-eval, checked against closed forms on small inputs (no model, no training)."""

import numpy as np
import pytest

from ldm_users.evaluation import metrics as M


def _random_psd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1.0 + 4.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # |dmu|^2 + sum (sqrt a - sqrt b)^2 = 5 + 2
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_the_eigenvalue_formula_and_is_symmetric():
    rng = np.random.default_rng(0)
    s1, s2 = _random_psd(rng, 6), _random_psd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # tr((S1 S2)^1/2) = sum of the square roots of the eigenvalues of S1 S2 (what torchmetrics computes).
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(M.frechet_distance(mu2, s2, mu1, s1), rel=1e-8)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_is_stable_for_singular_covariances_of_small_samples():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 32))  # 4 samples in 32 dimensions: rank-3 covariance
    assert M.frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-8)
    assert M.frechet_distance_features(x, x + 3.0) == pytest.approx(9.0 * 32, rel=1e-6)  # a pure shift


def test_the_few_samples_shortcut_equals_the_full_computation():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(200, 40)) @ rng.normal(size=(40, 40))
    mu, sigma = M.gaussian_stats(ref)
    for n in (2, 7, 39):  # fewer samples than dimensions: the n x n path
        x = rng.normal(loc=0.5, size=(n, 40))
        assert M.frechet_distance_to_stats(x, mu, sigma) == pytest.approx(
            M.frechet_distance(*M.gaussian_stats(x), mu, sigma), rel=1e-7)
        assert M.frechet_distance_features(x, ref) == pytest.approx(M.frechet_distance_features(ref, x), rel=1e-7)


def test_kid_is_about_zero_for_one_distribution_and_large_for_another():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    far = rng.normal(loc=2.0, size=(300, 8))
    same, _ = M.kernel_inception_distance(a, b, num_subsets=20, subset_size=100)
    diff, _ = M.kernel_inception_distance(a, far, num_subsets=20, subset_size=100)
    assert abs(same) < 0.05 * diff
    # Unbiased: over independent draws of one distribution the estimate averages to ~0 (it can be negative).
    values = [M.mmd2_unbiased(rng.normal(size=(50, 4)), rng.normal(size=(50, 4))) for _ in range(200)]
    assert abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(len(values))
    assert min(values) < 0


def test_topk_confusions_and_diversity():
    logits = np.array([[3.0, 2.0, 1.0], [0.0, 1.0, 5.0], [1.0, 0.0, 2.0], [0.1, 0.2, 0.3]])
    labels = np.array([0, 1, 0, 2])
    assert M.topk_correct(logits, labels, 1).tolist() == [True, False, False, True]
    assert M.topk_correct(logits, labels, 2).tolist() == [True, True, True, True]
    counts = M.confusion_matrix(np.array([0, 0, 0, 1, 1, 2]), np.array([1, 1, 0, 2, 1, 2]), 3)
    assert M.top_confusions(counts, ["a", "b", "c"], 5) == [("a", "b", 2), ("b", "c", 1)]

    x = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert M.mean_pairwise_distance(x) == pytest.approx((5 + 5 + 0) / 3)
    assert M.mean_pairwise_distance(np.repeat(x[:1], 5, 0)) == 0.0
    assert M.nearest_distances(x, x, exclude_self=True).tolist() == [0.0, 5.0, 0.0]
    assert M.nearest_distances(np.array([[3.0, 0.0]]), x).tolist() == [3.0]
