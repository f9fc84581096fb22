"""The Frechet distance between two Gaussians fitted to image features (FID, Heusel et al.).

    FID = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))

pytorch-fid computes Tr((S1 S2)^(1/2)) with scipy.linalg.sqrtm of the product. Here the
same trace comes from a symmetric eigen-decomposition in float64: S1 S2 is similar to
A = S1^(1/2) S2 S1^(1/2), symmetric positive semi-definite, so the trace of its square root is
the sum of the square roots of A's eigenvalues. No complex parts, no scipy; tests check it
agrees with pytorch-fid's formula. Statistics files are pytorch-fid's .npz (`mu`, `sigma`).
"""

from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,), covariance (D, D) (unbiased, as np.cov / pytorch-fid)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature vectors (N, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"FID: statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    between = root1 @ sigma2 @ root1  # (D, D), symmetric PSD, same eigenvalues as S1 S2
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((between + between.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-fid's statistics file (.npz with mu and sigma)."""
    try:
        with np.load(path) as stats:
            missing = [name for name in ("mu", "sigma") if name not in stats.files]
            if missing:
                raise ValueError(f"{path}: statistics file lacks {missing[0]!r} (pytorch-fid writes mu and sigma)")
            return stats["mu"], stats["sigma"]
    except OSError as e:
        raise ValueError(f"{path}: not a readable .npz statistics file ({e})") from None
