"""Fréchet Inception Distance from feature sets or their Gaussian statistics (float64, host).

The statistics are pytorch-fid's: ``mu`` = the feature mean, ``sigma`` = the unbiased covariance
(``np.cov(features, rowvar=False)``), and ``.npz`` files with exactly those two keys, so statistics
files made by pytorch-fid (``--save-stats``) or clean-fid's legacy mode load here and ours load there.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import scipy.linalg

from instaflow_jax.files import atomic_open


class StatisticsFileError(ValueError):
    """A reference-statistics ``.npz`` that is missing or not ``mu`` [D] + ``sigma`` [D, D]."""


@dataclasses.dataclass(frozen=True)
class GaussianStats:
    """A Gaussian fitted to features: ``mu`` [D] and ``sigma`` [D, D], float64; ``count`` samples."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> GaussianStats:
        """Features [N, D] (N ≥ 2) → mean and unbiased covariance (pytorch-fid's estimator)."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"FID needs features [N ≥ 2, D]; got shape {features.shape}.")
        return cls(features.mean(0), np.cov(features, rowvar=False), int(features.shape[0]))

    def save(self, path: str) -> str:
        """Write ``mu``, ``sigma`` (and ``count``) as ``.npz``, atomically."""
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with atomic_open(path) as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))
        return path

    @classmethod
    def load(cls, path: str) -> GaussianStats:
        """Read an ``.npz`` with ``mu`` [D] and ``sigma`` [D, D] (pytorch-fid's format)."""
        if not os.path.isfile(path):
            raise StatisticsFileError(
                f"reference statistics {path!r} not found; pass an .npz with 'mu' and 'sigma' "
                "(pytorch-fid --save-stats writes one), or leave the flag out to compute them."
            )
        with np.load(path) as data:
            missing = {"mu", "sigma"} - set(data.files)
            if missing:
                raise StatisticsFileError(
                    f"{path} has keys {sorted(data.files)}, missing {sorted(missing)}: a statistics "
                    "file holds 'mu' [D] and 'sigma' [D, D]."
                )
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            count = int(data["count"]) if "count" in data.files else -1
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise StatisticsFileError(
                f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit ([D] and [D, D])."
            )
        return cls(mu, sigma, count)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    imaginary_atol: float | None = 1e-3,
) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) between two Gaussians (float64).

    As pytorch-fid's ``calculate_frechet_distance``: when the product's square root is not finite
    (singular covariances, e.g. fewer samples than dimensions) both covariances get ``eps`` on the
    diagonal; a square root whose diagonal has an imaginary part larger than ``imaginary_atol`` is
    an error, a smaller one is numerical noise and dropped (``None``: always dropped).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}.")
    diff = mu1 - mu2
    root = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = np.eye(sigma1.shape[0]) * eps
        root = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if imaginary_atol is not None and not np.allclose(np.diagonal(root).imag, 0, atol=imaginary_atol):
            imaginary = np.max(np.abs(root.imag))
            raise ValueError(f"the covariance product's square root has an imaginary part {imaginary:.3g}.")
        root = root.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """Principal square root; non-finite entries (not an exception) when it does not exist."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns "singular matrix"; the caller checks finiteness
        return scipy.linalg.sqrtm(matrix)


def fid_from_features(a: np.ndarray, b: np.ndarray, imaginary_atol: float | None = 1e-3) -> float:
    """FID between Gaussians fitted to feature sets ``a`` [N, D] and ``b`` [M, D]."""
    sa, sb = GaussianStats.from_features(a), GaussianStats.from_features(b)
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma, imaginary_atol=imaginary_atol)
