"""Fréchet distance between two feature sets (FID, FVD-style), and its scipy reference.

Each set is summarised by a Gaussian (mean, covariance); the distance is
``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``.

The main implementation (:func:`frechet_distance_from_stats`) takes the trace term from two
symmetric eigendecompositions (``torch.linalg.eigh`` in float64): ``S_a^1/2 S_b S_a^1/2`` is
symmetric positive semi-definite and has the same eigenvalues as ``S_a S_b``, so the trace of the
square root is the sum of the square roots of those eigenvalues. Unlike ``scipy.linalg.sqrtm`` of
the non-symmetric product ``S_a S_b`` it never produces complex parts, needs no eps offset when
the covariances are rank-deficient (fewer samples than features, the usual case on a small
cohort), and runs on GPU if given GPU tensors. :func:`frechet_distance_scipy` is the usual
pytorch-fid computation, kept as the independent reference the tests compare against.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy import linalg

log = logging.getLogger(__name__)


def as_float64(feats) -> np.ndarray:
    """A torch tensor (any device/dtype, bf16 included) or array-like -> float64 numpy array."""
    if isinstance(feats, torch.Tensor):
        return feats.detach().to("cpu", torch.float64).numpy()
    return np.asarray(feats, dtype=np.float64)


def fit_gaussian(feats) -> tuple[np.ndarray, np.ndarray]:
    """feats (N, F) -> (mu (F,), sigma (F, F)), the unbiased (N - 1) covariance as in pytorch-fid."""
    x = as_float64(feats)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"expected features (N >= 2, F), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _numerical_rank_part(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Eigenvalues below the numerical-rank threshold set to exactly 0 (and no negative rounding).

    The threshold is NumPy's ``matrix_rank`` default, ``max|w| * F * eps``: eigh computes each
    eigenvalue to an absolute error of about that size, so smaller ones are rounding noise. Left in,
    that noise of ~1e-13 becomes ~3e-7 after the square root, on every one of the (F - N) null
    eigenvalues of a rank-deficient covariance, which made FD(a, b) and FD(b, a) differ in the 9th digit.
    """
    tol = eigenvalues.abs().max() * eigenvalues.shape[-1] * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > tol, eigenvalues, torch.zeros_like(eigenvalues))


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b), via eigh (see module doc).

    Memory: O(F^2) for the covariances, O(F^3) time (F = 2048 takes about a second on CPU).
    Rounding can make the distance of a set to itself a tiny negative number; it is clipped to 0.
    """
    mu_a, mu_b = (torch.as_tensor(m, dtype=torch.float64) for m in (mu_a, mu_b))
    s_a, s_b = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma_a, sigma_b))
    if mu_a.shape != mu_b.shape or s_a.shape != s_b.shape or s_a.shape != (*mu_a.shape, *mu_a.shape):
        raise ValueError(f"shape mismatch: mu {tuple(mu_a.shape)}/{tuple(mu_b.shape)}, "
                         f"sigma {tuple(s_a.shape)}/{tuple(s_b.shape)}")
    s_b = s_b.to(s_a.device)
    w, v = torch.linalg.eigh((s_a + s_a.T) / 2)  # S_a = V diag(w) V^T
    sqrt_a = (v * _numerical_rank_part(w).sqrt()) @ v.T  # (F, F) symmetric square root of S_a
    m = sqrt_a @ s_b @ sqrt_a  # (F, F) symmetric PSD, same spectrum as S_a S_b
    tr_covmean = _numerical_rank_part(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    diff = (mu_a - mu_b.to(mu_a.device)).square().sum()
    fd = diff + torch.trace(s_a) + torch.trace(s_b) - 2 * tr_covmean
    return max(float(fd), 0.0)


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between two feature sets (N_a, F) and (N_b, F) (numpy or torch)."""
    return frechet_distance_from_stats(*fit_gaussian(feats_a), *fit_gaussian(feats_b))


def frechet_3d(real_feats, fake_feats) -> float:
    """FVD-style distance: the Fréchet distance on 3D volume features from a passed-in extractor.

    The features come from :func:`ctgen.metrics.features.volume_features` with the trained CLIP
    volume encoder, the classifier, or I3D/CT-Net weights where a user has them.
    """
    return frechet_distance(real_feats, fake_feats)


def frechet_distance_scipy(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Reference: pytorch-fid's computation with ``scipy.linalg.sqrtm`` of ``S_a S_b``.

    eps: diagonal offset added to both covariances when the product is too near-singular for
    sqrtm to return a finite result. Tiny imaginary parts from rounding are dropped; large ones
    raise (as pytorch-fid does).
    """
    mu_a, s_a = fit_gaussian(feats_a)
    mu_b, s_b = fit_gaussian(feats_b)
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():
        log.warning("sqrtm of a near-singular product; adding %g to the covariance diagonals", eps)
        offset = np.eye(s_a.shape[0]) * eps
        covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))
