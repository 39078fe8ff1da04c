"""Evaluation metrics against closed forms, brute force and hand-computed point sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from presto.eval import metrics
from presto.eval.metrics import (
    clap_score,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_statistics,
    mmd,
    prdc,
)


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_reference(mu1, s1, mu2, s2) -> float:
    """Independent route: Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), a symmetric PSD matrix whose
    eigenvalues numpy's eigh gives directly."""
    r = _psd_sqrt(s1)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


# ---------------------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_from_stats_commuting_covariances_closed_form():
    # S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T commute, so (S1 S2)^(1/2) = Q diag(sqrt(a b)) Q^T and
    # FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    d = 6
    q = _orthogonal(rng, d)
    a = rng.uniform(0.1, 4.0, d)
    b = rng.uniform(0.1, 4.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance_from_stats(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_from_stats_one_dimension_is_w2_squared():
    # Between N(m1, s1^2) and N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2.
    got = frechet_distance_from_stats(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[0.25]]))
    assert got == pytest.approx(3.0**2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_frechet_from_stats_non_commuting_matches_symmetric_form():
    rng = np.random.default_rng(1)
    d = 8
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    got = frechet_distance_from_stats(mu1, s1, mu2, s2)
    assert got == pytest.approx(_frechet_reference(mu1, s1, mu2, s2), rel=1e-8)
    assert got == pytest.approx(frechet_distance_from_stats(mu2, s2, mu1, s1), rel=1e-8)


def test_frechet_on_samples_converges_to_closed_form():
    rng = np.random.default_rng(2)
    d, n = 4, 40_000
    q = _orthogonal(rng, d)
    a = np.array([0.5, 1.0, 2.0, 3.0])
    b = np.array([2.0, 0.5, 1.0, 3.0])
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, -0.5, 0.0])
    # x = mu + (z * sqrt(eigenvalues)) Q^T has covariance Q diag(eigenvalues) Q^T.
    real = mu1 + (rng.normal(size=(n, d)) * np.sqrt(a)) @ q.T
    fake = mu2 + (rng.normal(size=(n, d)) * np.sqrt(b)) @ q.T
    w_a, v_a = np.linalg.eigh(q @ np.diag(a) @ q.T)  # closed form from numpy's eigendecomposition
    b_in_a_basis = np.diag(v_a.T @ (q @ np.diag(b) @ q.T) @ v_a)  # commuting: diagonal in the same basis
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(w_a) - np.sqrt(b_in_a_basis)) ** 2)
    got = frechet_distance(real, fake)
    assert expected == pytest.approx(1.25 + 0.7574, abs=1e-4)  # 0.5 + 0.0858 + 0.1716 + 0 from the spectra
    assert got == pytest.approx(expected, abs=0.03)


def test_frechet_identical_sets_is_zero_and_shifted_set_adds_shift():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 5))
    assert abs(frechet_distance(x, x)) < 1e-8
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    # Same covariance, so only the mean term remains.
    assert frechet_distance(x, x + shift) == pytest.approx(shift @ shift, rel=1e-7)


def test_frechet_fewer_samples_than_dimensions_stays_accurate():
    # Singular covariances are the normal case for small test sets; sqrtm still gets the trace right.
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(10, 40)), 1.5 * rng.normal(size=(12, 40)) + 0.3
    stats = (*gaussian_statistics(real), *gaussian_statistics(fake))
    got = frechet_distance(real, fake)
    assert np.isfinite(got)
    assert got == pytest.approx(_frechet_reference(*stats), rel=1e-6)


def test_frechet_eps_fallback_when_sqrtm_fails(monkeypatch):
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def failing_first(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", failing_first)
    s1, s2 = np.diag([1.0, 2.0, 3.0]), np.diag([3.0, 2.0, 1.0])
    got = frechet_distance_from_stats(np.zeros(3), s1, np.zeros(3), s2, eps=1e-6)
    assert len(calls) == 2
    expected = np.sum((np.sqrt([1.0, 2.0, 3.0]) - np.sqrt([3.0, 2.0, 1.0])) ** 2)
    assert got == pytest.approx(expected, abs=1e-5)


def test_gaussian_statistics_are_mean_and_unbiased_covariance():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 3))
    mu, sigma = gaussian_statistics(x)
    centred = x - x.mean(axis=0)
    np.testing.assert_allclose(mu, x.sum(axis=0) / 30)
    np.testing.assert_allclose(sigma, centred.T @ centred / 29)
    y = rng.normal(size=(25, 3)) + 1
    assert frechet_distance_from_stats(mu, sigma, *gaussian_statistics(y)) == pytest.approx(frechet_distance(x, y))


def test_frechet_rejects_bad_input():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="width"):
        frechet_distance(x, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="fake: holds NaN"):
        frechet_distance(x, np.full((5, 3), np.nan))
    with pytest.raises(ValueError, match="real: needs at least 2 rows"):
        frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match=r"sigma_fake: expected shape \(3, 3\)"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


# ---------------------------------------------------------------------------------------------------------
# MMD


def _mmd_brute_force(x, y, bandwidth, scale):
    def k(u, v):
        return math.exp(-sum((ui - vi) ** 2 for ui, vi in zip(u, v)) / (2 * bandwidth**2))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return scale * (xx + yy - 2 * xy)


@pytest.mark.parametrize("bandwidth, scale", [(10.0, 1000.0), (1.5, 1.0)])
def test_mmd_matches_double_loop(bandwidth, scale):
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(5, 3)) * 3, rng.normal(size=(7, 3)) * 3 + 1
    expected = _mmd_brute_force(x.tolist(), y.tolist(), bandwidth, scale)
    assert mmd(x, y, bandwidth=bandwidth, scale=scale) == pytest.approx(expected, rel=1e-10)


def test_mmd_kernel_convention_on_two_point_sets():
    # real = {0, 0}, fake = {10, 10} on a line: k_rr = k_ff = 1 off the diagonal and
    # k_rf = exp(-10^2 / (2 * 10^2)) = e^-0.5, so MMD^2 = 2 - 2 e^-0.5 = 0.786939..., times 1000.
    real, fake = np.zeros((2, 1)), np.full((2, 1), 10.0)
    assert mmd(real, fake) == pytest.approx(1000 * (2 - 2 * math.exp(-0.5)), rel=1e-12)


def _gaussian_mmd2(shift: float, bandwidth: float, d: int) -> float:
    """Population MMD^2 between N(0, I) and N(shift e, I) in d dimensions: the difference of two such
    points is N(., 2I), and E exp(-|Z|^2 / (2 s^2)) for Z ~ N(m, 2I) is c * exp(-|m|^2 / (2 (s^2 + 2)))
    with c = (s^2 / (s^2 + 2))^(d/2)."""
    c = (bandwidth**2 / (bandwidth**2 + 2)) ** (d / 2)
    return 2 * c * (1 - math.exp(-(shift**2) / (2 * (bandwidth**2 + 2))))


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_mmd_is_unbiased(shift):
    # The mean of many estimates meets the population value (zero for one distribution) within its
    # standard error; a biased (V-statistic) estimator would sit above it by about 2 (1 - c) / n.
    rng = np.random.default_rng(7)
    d, n, bandwidth = 4, 40, 2.0
    offset = np.zeros(d)
    offset[0] = shift
    values = np.array([
        mmd(rng.normal(size=(n, d)), rng.normal(size=(n, d)) + offset, bandwidth=bandwidth, scale=1.0)
        for _ in range(100)
    ])
    stderr = values.std(ddof=1) / math.sqrt(len(values))
    assert abs(values.mean() - _gaussian_mmd2(shift, bandwidth, d)) < 3 * stderr
    if shift == 0.0:
        assert (values < 0).any() and (values > 0).any()  # centred on 0, so single draws can be negative
        c = (bandwidth**2 / (bandwidth**2 + 2)) ** (d / 2)
        assert 2 * (1 - c) / n > 6 * stderr  # the test can tell the unbiased estimator from the biased one


def test_mmd_grows_with_mean_shift():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(100, 4)), rng.normal(size=(100, 4))
    direction = np.array([1.0, 1.0, 0.0, 0.0]) / math.sqrt(2)
    values = [mmd(x, y + s * direction, bandwidth=2.0) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values[1] > 0
    assert all(later > earlier for earlier, later in zip(values, values[1:]))
    assert values[-1] == pytest.approx(1000 * _gaussian_mmd2(4.0, 2.0, 4), rel=0.1)


def test_mmd_rejects_bad_bandwidth():
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(np.zeros((3, 2)), np.ones((3, 2)), bandwidth=0.0)


# ---------------------------------------------------------------------------------------------------------
# Precision, recall, density, coverage


def _on_x_axis(xs):
    return np.array([[x, 0.0] for x in xs])


def test_prdc_hand_computed_k1():
    # real:  a=0, b=1, c=10, d=13, e=100, f=101 on the x-axis. 1-NN radii: a 1, b 1, c 3, d 3, e 1, f 1.
    # fake:  s=-4, p=0.5, q=14, r=30.                            1-NN radii: s 4.5, p 4.5, q 13.5, r 16.
    # precision: p in ball(a) (0.5<1), q in ball(d) (1<3); s (4 from a) and r (17 from d) in none -> 2/4
    # recall:    a, b in ball(p) (0.5<4.5); c, d in ball(q) (4, 1 < 13.5); e, f (70+ from r) in none -> 4/6
    # density:   p lies in ball(a) and ball(b), q in ball(d) only, s and r in none -> 3 / (k*M = 4) = 0.75
    # coverage:  ball(a), ball(b) hold p; ball(d) holds q; ball(c) (q is 4 > 3 away), e, f hold none -> 3/6
    real, fake = _on_x_axis([0, 1, 10, 13, 100, 101]), _on_x_axis([-4, 0.5, 14, 30])
    expected = {"precision": 0.5, "recall": 4 / 6, "density": 0.75, "coverage": 0.5}
    assert prdc(real, fake, k=1) == pytest.approx(expected, abs=1e-12)

    # The same answer after a rotation and a translation: only Euclidean distances matter.
    angle = 0.7
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    offset = np.array([3.0, -8.0])
    assert prdc(real @ rotation.T + offset, fake @ rotation.T + offset, k=1) == pytest.approx(expected, abs=1e-12)


def test_prdc_hand_computed_k2():
    # real: a=0, b=1, c=3.       2nd-NN radii: a 3 (b 1, c 3), b 2 (a 1, c 2), c 3 (b 2, a 3).
    # fake: q=-2.5, p=5.5, r=10. 2nd-NN radii: q 12.5 (p 8, r 12.5), p 8 (r 4.5, q 8), r 12.5 (p 4.5, q 12.5).
    # precision: q in ball(a) (2.5<3), p in ball(c) (2.5<3), r (7 from c) in none        -> 2/3
    # recall:    a, b in ball(q) (2.5, 3.5 < 12.5), c in ball(p) (2.5 < 8)                 -> 1
    # density:   q in ball(a) only (3.5 >= 2 from b), p in ball(c) only, r none -> 2 / (k*M = 6) = 1/3
    # coverage:  ball(a) holds q, ball(c) holds p, ball(b) (radius 2; nearest fake 3.5) none -> 2/3
    # A 1-NN radius by mistake (a 1, b 1, c 2) would give precision 0: this pins "k-th neighbour, self excluded".
    real, fake = _on_x_axis([0, 1, 3]), _on_x_axis([-2.5, 5.5, 10])
    expected = {"precision": 2 / 3, "recall": 1.0, "density": 1 / 3, "coverage": 2 / 3}
    assert prdc(real, fake, k=2) == pytest.approx(expected, abs=1e-12)


def test_prdc_identical_sets_score_one():
    # Each point's open ball holds itself and its k-1 nearer neighbours (not the k-th, which sits on the
    # boundary), so every fake point lies in exactly k real balls on average: density is exactly 1.
    x = np.random.default_rng(9).normal(size=(60, 3))
    assert prdc(x, x.copy(), k=5) == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}, abs=1e-12
    )


def test_prdc_disjoint_far_sets_score_zero():
    rng = np.random.default_rng(10)
    real, fake = rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) + 1000.0
    assert prdc(real, fake, k=5) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_needs_more_than_k_samples():
    with pytest.raises(ValueError, match="fake: needs at least 6 rows"):
        prdc(np.zeros((10, 2)), np.zeros((5, 2)), k=5)
    with pytest.raises(ValueError, match="k must be"):
        prdc(np.zeros((10, 2)), np.zeros((10, 2)), k=0)


# ---------------------------------------------------------------------------------------------------------
# CLAP score


def test_clap_score_is_100_times_mean_cosine():
    audio = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    # Row pairs at 0, 90, 60 and 180 degrees; lengths do not matter: cosines 1, 0, 0.5, -1.
    text = np.array([[5.0, 0.0], [0.0, 1.0], [math.sqrt(3), 1.0], [-1.0, 0.0]])
    assert clap_score(audio, text) == pytest.approx(100 * (1 + 0 + 0.5 - 1) / 4, rel=1e-12)


def test_clap_score_rejects_unpaired_or_zero_embeddings():
    with pytest.raises(ValueError, match="one prompt per clip"):
        clap_score(np.ones((3, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="all zeros"):
        clap_score(np.zeros((1, 2)), np.ones((1, 2)))


def test_frechet_to_a_fixed_reference_matches_the_general_formula():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 12)), 1.3 * rng.normal(size=(25, 12)) + 0.2
    assert metrics.FrechetToReference(real)(fake) == pytest.approx(metrics.frechet_distance(real, fake))
    draws = metrics.bootstrap_draws(25, 7, seed=3)
    assert draws.shape == (7, 25) and draws.min() >= 0 and draws.max() < 25
    assert (draws == metrics.bootstrap_draws(25, 7, seed=3)).all()
