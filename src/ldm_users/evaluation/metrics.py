"""Sample-quality statistics on feature arrays: Fréchet distance, KID, accuracy, diversity, nearest neighbours.

Pure numpy (float64) on (N, D) arrays, so every number can be checked by hand on small inputs.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features; needs N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(x)}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), the distance FID is defined with.

    tr((S1 S2)^1/2) is computed as tr((S1^1/2 S2 S1^1/2)^1/2): the same eigenvalues, but of a symmetric PSD
    matrix, so it is stable for the singular covariances small samples give (no scipy needed).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean, 0.0))


def frechet_distance_to_stats(samples: np.ndarray, mu, sigma) -> float:
    """The Fréchet distance from samples' Gaussian to (mu, sigma); fast when there are fewer samples than dimensions.

    With B the centred samples / sqrt(n - 1), S_x = B^T B and the nonzero eigenvalues of S_x sigma are those of the
    n x n matrix B sigma B^T: an n x n eigenproblem instead of two d x d ones (2048-d Inception features, a few
    dozen images: milliseconds instead of seconds).
    """
    x = np.asarray(samples, np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    if n > d:
        return frechet_distance(*gaussian_stats(x), mu, sigma)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    b = (x - x.mean(0)) / np.sqrt(n - 1)
    small = b @ sigma @ b.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    diff = x.mean(0) - mu
    return float(max(diff @ diff + np.trace(sigma) + (b * b).sum() - 2 * tr_covmean, 0.0))


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two sets of (N, D) features."""
    if len(a) > len(b):
        a, b = b, a  # symmetric: put the smaller set on the fast path
    return frechet_distance_to_stats(a, *gaussian_stats(b))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # The KID kernel (Binkowski et al. 2018): (x.y / d + 1)^3.
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (diagonal terms excluded)."""
    n, m = len(x), len(y)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def kernel_inception_distance(generated: np.ndarray, real: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and std of the unbiased MMD^2 over random subsets (the whole sets when they are small)."""
    x, y = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError("KID needs at least 2 generated and 2 real samples")
    if size == len(x) and size == len(y):
        return mmd2_unbiased(x, y), 0.0  # every subset would be the whole set
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(N,) bool: is the true label among the k highest logits."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1)[:, :k]
    return (top == np.asarray(labels)[:, None]).any(1)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
    return counts


def top_confusions(counts: np.ndarray, names: list[str], limit: int) -> list[tuple[str, str, int]]:
    """The most frequent (true, predicted) pairs off the diagonal, most frequent first."""
    off = counts.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:limit]
    pairs = []
    for flat in order:
        t, p = np.unravel_index(flat, off.shape)
        if off[t, p] == 0:
            break
        pairs.append((names[t], names[p], int(off[t, p])))
    return pairs


def _pairwise_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.sqrt(np.clip(sq, 0, None))


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over distinct pairs: 0 when every sample is the same (mode collapse)."""
    x = np.asarray(features, np.float64)
    n = len(x)
    if n < 2:
        raise ValueError("diversity needs at least 2 samples")
    return float(_pairwise_dist(x, x).sum() / (n * (n - 1)))


def nearest_distances(queries: np.ndarray, references: np.ndarray, exclude_self: bool = False,
                      chunk: int = 512) -> np.ndarray:
    """(N,) distance of each query to its nearest reference (itself excluded when queries are the references)."""
    q, r = np.asarray(queries, np.float64), np.asarray(references, np.float64)
    out = np.empty(len(q))
    for start in range(0, len(q), chunk):
        d = _pairwise_dist(q[start:start + chunk], r)
        if exclude_self:
            idx = np.arange(start, min(start + chunk, len(q)))
            d[idx - start, idx] = np.inf
        out[start:start + chunk] = d.min(1)
    return out
