"""Samplers against exact denoisers: a Gaussian N(MU, S^2) (closed-form PF-ODE) and a 1-D Gaussian mixture.

For x0 ~ N(mu, s^2) the exact denoiser is D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the
probability-flow ODE moves x - mu in proportion to sqrt(s^2 + sigma^2). For a mixture sum_k w_k N(m_k, s_k^2)
the exact denoiser is the responsibility-weighted sum of the components' posterior means.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from presto.config import SAMPLER_NAMES
from presto.diffusion.guidance import NFECounter
from presto.diffusion.noise import rho_schedule
from presto.diffusion.sampling import (
    SAMPLERS,
    PerItemNoise,
    consistency_sigmas,
    karras_sigmas,
    sample,
    sample_consistency,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_euler,
    sample_heun,
)

SMIN, SMAX, RHO = 0.002, 80.0, 7.0
MU, S = 0.2, 0.6
WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
MEANS = torch.tensor([-1.0, 0.6], dtype=torch.float64)
STDS = torch.tensor([0.3, 0.4], dtype=torch.float64)
N = 40_000

DIFFUSION_SAMPLERS = ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"]
STOCHASTIC = ["dpmpp_2m_sde", "dpmpp_3m_sde", "consistency"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


def _column(sigma, x):
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_denoiser(x, sigma, cond):
    return MU + S**2 / (S**2 + _column(sigma, x) ** 2) * (x - MU)


def _mixture_posterior(x, sigma):
    """Per element: responsibilities r_k, component posterior means and variances (float64)."""
    s2 = _column(sigma, x).double().unsqueeze(-1) ** 2
    xx = x.double().unsqueeze(-1)
    var = STDS**2 + s2
    r = torch.softmax(WEIGHTS.log() - 0.5 * (xx - MEANS) ** 2 / var - 0.5 * var.log(), dim=-1)
    return r, MEANS + STDS**2 / var * (xx - MEANS), STDS**2 * s2 / var


def mixture_denoiser(x, sigma, cond):
    r, mean, _ = _mixture_posterior(x, sigma)
    return (r * mean).sum(-1).to(x.dtype)


def mixture_cdf(x):
    z = (x.double().unsqueeze(-1) - MEANS) / (STDS * math.sqrt(2))
    return (WEIGHTS * 0.5 * (1 + torch.erf(z))).sum(-1)


def ks_to_mixture(samples):
    """Kolmogorov-Smirnov distance between the samples and the exact mixture CDF."""
    xs, _ = samples.flatten().double().sort()
    n = xs.numel()
    cdf, i = mixture_cdf(xs), torch.arange(1, n + 1, dtype=torch.float64)
    return max((cdf - (i - 1) / n).abs().max().item(), (i / n - cdf).abs().max().item())


def seeded_noise(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype)


def start(n=N, seed=0):
    return SMAX * torch.randn(n, 1, generator=torch.Generator().manual_seed(seed))


def ode_solution(x_start, sigma_start, sigma_end):
    return MU + (x_start - MU) * math.sqrt(S**2 + sigma_end**2) / math.sqrt(S**2 + sigma_start**2)


# ---- schedules ----------------------------------------------------------------------------------------


def test_karras_sigmas():
    s = karras_sigmas(10, SMIN, SMAX, RHO)
    assert s.shape == (11,) and s.dtype == torch.float32 and s[-1].item() == 0
    assert s[0].item() == pytest.approx(SMAX) and s[-2].item() == pytest.approx(SMIN)
    assert bool((s[1:] < s[:-1]).all())
    torch.testing.assert_close(karras_sigmas(5, 1.0, 9.0, 1.0), torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0, 0.0]))
    torch.testing.assert_close(karras_sigmas(1, SMIN, SMAX, RHO), torch.tensor([SMAX, 0.0]))
    with pytest.raises(ValueError, match="n = 0"):
        karras_sigmas(0, SMIN, SMAX, RHO)


def test_consistency_sigmas_skip_the_last_grid_point():
    torch.testing.assert_close(consistency_sigmas(1, SMIN, SMAX, RHO), torch.tensor([SMAX, 0.0]))
    s = consistency_sigmas(4, SMIN, SMAX, RHO)
    u = torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64)
    torch.testing.assert_close(s[:-1], rho_schedule(u, SMIN, SMAX, RHO).float())
    assert s[-1].item() == 0 and s[-2].item() > SMIN
    # Larger rho: later steps at lower noise (the paper's diversity/quality knob).
    assert bool((consistency_sigmas(4, SMIN, SMAX, 1000.0)[1:-1] < s[1:-1]).all())


# ---- deterministic samplers follow the probability-flow ODE -------------------------------------------

ODE_ORDERS = {
    "euler": (sample_euler, 1),
    "heun": (sample_heun, 2),
    "dpmpp_2m": (sample_dpmpp_2m, 2),
    "dpmpp_2m_sde(eta=0)": (functools.partial(sample_dpmpp_2m_sde, eta=0.0), 2),
    "dpmpp_3m_sde(eta=0)": (functools.partial(sample_dpmpp_3m_sde, eta=0.0), 3),
}


@pytest.mark.parametrize("name", ODE_ORDERS)
def test_ode_samplers_converge_to_the_closed_form_at_their_order(name):
    """Grid from SMAX to SMIN (no final 0) so that every step is a full step of the method."""
    fn, order = ODE_ORDERS[name]
    x = start(2000)
    exact = ode_solution(x, SMAX, SMIN)
    errors = {}
    for n in (2, 8, 32, 64, 128):
        out = fn(gaussian_denoiser, x, karras_sigmas(n, SMIN, SMAX, RHO)[:-1], cond=None)
        errors[n] = (out - exact).abs().max().item()
    assert errors[2] > errors[8] > errors[32] > errors[64] > errors[128]
    # Halving the step multiplies the error by about 2^-order.
    assert errors[64] / errors[128] > 0.8 * 2**order
    assert errors[128] < {1: 0.06, 2: 3e-3, 3: 3e-4}[order]


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_ode_samplers_end_on_the_closed_form_at_zero(name):
    x = start(2000)
    out = SAMPLERS[name](gaussian_denoiser, x, karras_sigmas(128, SMIN, SMAX, RHO), cond=None)
    torch.testing.assert_close(out, ode_solution(x, SMAX, 0.0), rtol=0, atol=0.06 if name == "euler" else 3e-3)


# ---- every sampler reaches the right distribution -----------------------------------------------------


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_gaussian_target_mean_and_std(name):
    x = start()
    out = SAMPLERS[name](gaussian_denoiser, x, karras_sigmas(128, SMIN, SMAX, RHO), cond=None, noise=seeded_noise(1))
    assert out.mean().item() == pytest.approx(MU, abs=4 * S / math.sqrt(N) + 0.002)
    assert out.std().item() == pytest.approx(S, rel=0.03)


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_mixture_target_error_shrinks_with_steps(name):
    x = start()
    ks = {n: ks_to_mixture(SAMPLERS[name](mixture_denoiser, x, karras_sigmas(n, SMIN, SMAX, RHO), cond=None,
                                          noise=seeded_noise(1)))
          for n in (2, 8, 32, 128)}
    assert ks[2] > ks[8] > ks[32]
    assert ks[32] < 0.04
    assert ks[128] < 0.012  # the sampling noise of 40k draws alone is ~0.005


def posterior_generator(seed):
    """A perfect one-step generator: G(x, sigma) draws x0 ~ p(x0 | x_sigma = x) for the mixture."""
    g = torch.Generator().manual_seed(seed)

    def generator(x, sigma, cond):
        r, mean, var = _mixture_posterior(x, sigma)
        k = torch.multinomial(r.reshape(-1, len(WEIGHTS)), 1, generator=g).reshape(r.shape[:-1] + (1,))
        draw = mean.gather(-1, k) + var.gather(-1, k).sqrt() * torch.randn(k.shape, generator=g, dtype=torch.float64)
        return draw.squeeze(-1).to(x.dtype)

    return generator


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampler_with_a_perfect_generator(steps):
    sigmas = consistency_sigmas(steps, SMIN, SMAX, RHO)
    seen = []
    out = sample_consistency(posterior_generator(7), start(), sigmas, cond=None, noise=seeded_noise(8),
                             callback=lambda step: seen.append(step.sigma))
    assert seen == pytest.approx(sigmas[:-1].tolist())
    assert ks_to_mixture(out) < 0.012


def test_consistency_sampler_renoises_the_estimate_to_the_next_sigma():
    """With G = identity, x after the run is x_0 + sigma_1 z_1 + sigma_2 z_2 + ... for the noise draws z."""
    draws = []

    def noise(like):
        draws.append(torch.randn(like.shape))
        return draws[-1]

    x = torch.randn(3, 4)
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.0])
    out = sample_consistency(lambda x, sigma, cond: x, x, sigmas, cond=None, noise=noise)
    assert len(draws) == 2
    torch.testing.assert_close(out, x + 3.0 * draws[0] + 1.0 * draws[1])


# ---- seeds, registry, bookkeeping ---------------------------------------------------------------------


@pytest.mark.parametrize("name", STOCHASTIC + ["heun"])
def test_per_item_seeds_make_a_sample_independent_of_its_batch(name):
    denoiser = mixture_denoiser if name != "consistency" else posterior_like_denoiser
    sigmas = consistency_sigmas(4, SMIN, SMAX, RHO) if name == "consistency" else karras_sigmas(6, SMIN, SMAX, RHO)
    batch = sample(name, denoiser, PerItemNoise([11, 12, 13]), (3, 2, 5), sigmas, cond=None)
    alone = sample(name, denoiser, PerItemNoise([12]), (1, 2, 5), sigmas, cond=None)
    torch.testing.assert_close(batch[1:2], alone)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError, match="3 items but 1 seeds"):
        PerItemNoise([1])(torch.zeros(3, 2))


def posterior_like_denoiser(x, sigma, cond):
    """A deterministic stand-in for a generator (per item, no batch coupling)."""
    return torch.tanh(mixture_denoiser(x, sigma, cond))


def test_sample_draws_the_start_from_the_noise_source_and_passes_options():
    sigmas = karras_sigmas(5, SMIN, SMAX, RHO)
    out = sample("dpmpp_2m_sde", mixture_denoiser, seeded_noise(3), (4, 3), sigmas, cond=None, eta=0.5)
    draw = seeded_noise(3)
    x = SMAX * draw(torch.zeros(4, 3))
    torch.testing.assert_close(out, sample_dpmpp_2m_sde(mixture_denoiser, x, sigmas, cond=None, noise=draw, eta=0.5))
    with pytest.raises(ValueError, match="unknown sampler 'ddpm'"):
        sample("ddpm", mixture_denoiser, seeded_noise(3), (4, 3), sigmas, cond=None)
    with pytest.raises(ValueError, match="eta"):
        sample("dpmpp_3m_sde", mixture_denoiser, seeded_noise(3), (4, 3), sigmas, cond=None, eta=-1)


def test_params_know_every_sampler_and_only_those():
    # params validation checks sampler names without importing torch, against its own list
    assert sorted(SAMPLER_NAMES) == sorted(SAMPLERS)


@pytest.mark.parametrize("bad", [[1.0, 2.0, 0.0], [5.0, 0.0, 0.0], [3.0]])
def test_bad_sigma_grids_are_rejected(bad):
    with pytest.raises(ValueError, match="sigmas"):
        sample_euler(gaussian_denoiser, torch.zeros(2, 1), torch.tensor(bad), cond=None)


@pytest.mark.parametrize("name, nfe", [("euler", 6), ("heun", 11), ("dpmpp_2m", 6), ("dpmpp_2m_sde", 6),
                                       ("dpmpp_3m_sde", 6), ("consistency", 6)])
def test_nfe_and_callbacks(name, nfe):
    counter = NFECounter(gaussian_denoiser)
    steps = []
    sigmas = karras_sigmas(6, SMIN, SMAX, RHO)
    sample(name, counter, seeded_noise(0), (2, 3), sigmas, cond=None, callback=steps.append)
    assert counter.nfe == nfe
    assert [s.i for s in steps] == list(range(6))
    assert [s.sigma for s in steps] == pytest.approx(sigmas[:-1].tolist())
    assert all(s.denoised.shape == (2, 3) for s in steps)
