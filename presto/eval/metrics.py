"""Distribution metrics between a reference set and a generated set of embeddings.

All functions take embeddings as arrays [N, D] (one row per clip) and compute in float64. The paper reports
them on LAION-CLAP embeddings (presto-method.md, section 5); on any other embedder the numbers are only
comparable with each other, never with the paper's.

- Frechet distance (FAD when the embeddings are audio embeddings): both sets as Gaussians,
  ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)).
- MMD: unbiased MMD^2 with a Gaussian RBF kernel, in CMMD's units (bandwidth 10, times 1000).
- PRDC: precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020), all from
  k-nearest-neighbour balls.
- CLAP score: mean text-audio cosine similarity, times 100.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
from scipy.spatial.distance import cdist


def _embeddings(x: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected embeddings of shape [N, D], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name}: expected numbers, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows (embeddings), got {x.shape[0]}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: holds NaN or Inf")
    return x


def _pair(a: np.ndarray, b: np.ndarray, min_rows: int, names: tuple[str, str] = ("real", "fake")
          ) -> tuple[np.ndarray, np.ndarray]:
    a = _embeddings(a, names[0], min_rows)
    b = _embeddings(b, names[1], min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} embeddings differ in width: {a.shape[1]} vs {b.shape[1]}")
    return a, b


# ---------------------------------------------------------------------------------------------------------
# Frechet distance


def gaussian_statistics(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of embeddings [N, D]: what a reference set is stored as."""
    x = _embeddings(embeddings, "embeddings", 2)
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def frechet_distance_from_stats(
    mu_real: np.ndarray, sigma_real: np.ndarray, mu_fake: np.ndarray, sigma_fake: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu_real, sigma_real) and N(mu_fake, sigma_fake).

    Tr (S_r S_f)^(1/2) uses scipy's matrix square root. The product of two PSD matrices has real,
    non-negative eigenvalues, so any imaginary part is rounding error and is dropped once checked to be
    small. Singular covariances (fewer clips than dimensions) are normal and sqrtm handles them; only if it
    returns non-finite values is eps * I added to both covariances (the usual FID/FAD fallback).
    """
    mu_r = np.atleast_1d(np.asarray(mu_real, dtype=np.float64))
    mu_f = np.atleast_1d(np.asarray(mu_fake, dtype=np.float64))
    s_r = np.atleast_2d(np.asarray(sigma_real, dtype=np.float64))
    s_f = np.atleast_2d(np.asarray(sigma_fake, dtype=np.float64))
    d = mu_r.shape[0]
    for name, arr, shape in (("mu_real", mu_r, (d,)), ("mu_fake", mu_f, (d,)),
                             ("sigma_real", s_r, (d, d)), ("sigma_fake", s_f, (d, d))):
        if arr.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: holds NaN or Inf")

    with warnings.catch_warnings():
        # "Matrix is singular" is expected when N <= D; the result is still accurate (tested).
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s_r @ s_f)
        if not np.isfinite(covmean).all():
            offset = eps * np.eye(d)
            covmean = scipy.linalg.sqrtm((s_r + offset) @ (s_f + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, abs(np.trace(covmean.real))):
            raise ValueError(f"Frechet distance: sqrtm(sigma_real @ sigma_fake) has an imaginary part of {imag:.3g}; "
                             "are both covariances symmetric positive semi-definite?")
        covmean = covmean.real

    diff = mu_r - mu_f
    return float(diff @ diff + np.trace(s_r) + np.trace(s_f) - 2.0 * np.trace(covmean))


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two sets of embeddings [N, D] (FAD on audio embeddings)."""
    real, fake = _pair(real, fake, 2)
    return frechet_distance_from_stats(*gaussian_statistics(real), *gaussian_statistics(fake))


class FrechetToReference:
    """Frechet distance from one fixed reference set to many generated sets, e.g. bootstrap resamples.

    With R = S_r^(1/2) (symmetric, computed once), S_r S_f = R (R S_f R) R^-1 is similar to the symmetric PSD
    matrix R S_f R, so Tr (S_r S_f)^(1/2) is the sum of the square roots of its eigenvalues: one eigvalsh
    per set instead of a general sqrtm. Equal to frechet_distance(real, fake) (tested).
    """

    def __init__(self, real: np.ndarray):
        self.mu, self.sigma = gaussian_statistics(real)
        eigenvalues, vectors = np.linalg.eigh(self.sigma)
        self.root = (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T

    def __call__(self, fake: np.ndarray) -> float:
        mu_f, s_f = gaussian_statistics(fake)
        if mu_f.shape != self.mu.shape:
            raise ValueError(f"fake embeddings are {mu_f.shape[0]}-d, the reference {self.mu.shape[0]}-d")
        eigenvalues = np.linalg.eigvalsh(self.root @ s_f @ self.root)
        diff = self.mu - mu_f
        return float(diff @ diff + np.trace(self.sigma) + np.trace(s_f)
                     - 2.0 * np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def bootstrap_draws(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] row indices, each row n draws with replacement: the same draws for every set of n
    clips scored against one reference, so that the sets' differences can be bootstrapped paired."""
    if n < 2:
        raise ValueError(f"bootstrap needs at least 2 clips, got {n}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


# ---------------------------------------------------------------------------------------------------------
# Maximum mean discrepancy


def mmd(real: np.ndarray, fake: np.ndarray, bandwidth: float = 10.0, scale: float = 1000.0) -> float:
    """Unbiased MMD^2 between two sets of embeddings, times `scale`.

    Kernel (CMMD's convention, which the paper follows): k(x, y) = exp(-||x - y||^2 / (2 * bandwidth^2)).
    Unbiased estimator: the within-set means leave out the i == j terms,
        MMD^2 = sum_{i!=j} k(r_i, r_j) / (m (m-1)) + sum_{i!=j} k(f_i, f_j) / (n (n-1)) - 2 mean_{i,j} k(r_i, f_j),
    so it is centred on 0 for two samples of one distribution and can come out slightly negative.
    """
    if not bandwidth > 0:
        raise ValueError(f"mmd: bandwidth must be > 0, got {bandwidth}")
    real, fake = _pair(real, fake, 2)
    gamma = 1.0 / (2.0 * bandwidth**2)
    m, n = len(real), len(fake)
    k_rr = np.exp(-gamma * cdist(real, real, "sqeuclidean"))
    k_ff = np.exp(-gamma * cdist(fake, fake, "sqeuclidean"))
    k_rf = np.exp(-gamma * cdist(real, fake, "sqeuclidean"))
    within_real = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
    within_fake = (k_ff.sum() - np.trace(k_ff)) / (n * (n - 1))
    return float(scale * (within_real + within_fake - 2.0 * k_rf.mean()))


# ---------------------------------------------------------------------------------------------------------
# Precision, recall, density, coverage


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage from k-nearest-neighbour balls.

    Each sample gets a ball whose radius is the distance to its k-th nearest neighbour within its own set
    (itself excluded). With B(x, r) = {y : ||y - x|| < r}:
      precision = fraction of fake samples inside at least one real ball          (Kynkaanniemi et al. 2019)
      recall    = fraction of real samples inside at least one fake ball          (Kynkaanniemi et al. 2019)
      density   = (1 / (k M)) * sum over fake samples of the number of real balls containing it
                                                                                    (Naeem et al. 2020)
      coverage  = fraction of real balls that contain at least one fake sample    (Naeem et al. 2020)
    Balls are open (strict <), as in Naeem et al.'s reference code; for continuous data ties have
    probability zero, so this equals Kynkaanniemi's closed balls. It makes identical sets score exactly 1
    on all four (a point's own ball holds itself and its k-1 nearer neighbours, not the k-th).
    """
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"prdc: k must be an integer >= 1, got {k!r}")
    real, fake = _pair(real, fake, k + 1)

    d_rr = cdist(real, real)
    d_ff = cdist(fake, fake)
    d_rf = cdist(real, fake)  # [N real, M fake]
    # Index k of each sorted row skips the point itself (distance 0 at index 0).
    radius_real = np.partition(d_rr, k, axis=1)[:, k]
    radius_fake = np.partition(d_ff, k, axis=1)[:, k]

    fake_in_real_ball = d_rf < radius_real[:, None]  # [i, j]: fake j lies in the ball of real i
    real_in_fake_ball = d_rf < radius_fake[None, :]  # [i, j]: real i lies in the ball of fake j
    return {
        "precision": float(fake_in_real_ball.any(axis=0).mean()),
        "recall": float(real_in_fake_ball.any(axis=1).mean()),
        "density": float(fake_in_real_ball.sum() / (k * len(fake))),
        "coverage": float(fake_in_real_ball.any(axis=1).mean()),
    }


# ---------------------------------------------------------------------------------------------------------
# CLAP score


def clap_score(audio_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
    """100 x the mean cosine similarity between each clip's audio embedding and its prompt's text embedding
    (row i with row i)."""
    audio, text = _pair(audio_embeddings, text_embeddings, 1, ("audio_embeddings", "text_embeddings"))
    if len(audio) != len(text):
        raise ValueError(f"clap_score: {len(audio)} audio embeddings but {len(text)} text embeddings; "
                         "expected one prompt per clip")
    audio_norm = np.linalg.norm(audio, axis=1)
    text_norm = np.linalg.norm(text, axis=1)
    if (audio_norm == 0).any() or (text_norm == 0).any():
        raise ValueError("clap_score: an embedding is all zeros, so its cosine similarity is undefined")
    cosine = np.einsum("nd,nd->n", audio, text) / (audio_norm * text_norm)
    return float(100.0 * cosine.mean())
