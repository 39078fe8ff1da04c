"""CFG and CFG++ with exact conditional Gaussian denoisers.

Toy model: x0 | c ~ N(c, S^2) with one mean c per item; the "unconditional" condition is c = 0. Its exact
denoiser is D(x; sigma, c) = c (1 - k) + k x with k = S^2 / (S^2 + sigma^2), affine in c, so plain CFG
with scale w is exactly the denoiser of N(w c, S^2).
"""

from __future__ import annotations

import math

import pytest
import torch

from presto.diffusion.guidance import CFGPlusPlus, ClassifierFreeGuidance, NFECounter, concat_cond
from presto.diffusion.sampling import SAMPLERS, Estimate, PerItemNoise, karras_sigmas, sample, sample_euler

S = 0.6
SMIN, SMAX, RHO = 0.002, 80.0, 7.0
COND = torch.tensor([1.0, -0.5, 2.0])
UNCOND = torch.zeros(3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


def _column(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_given_mean(x, sigma, cond):
    """Exact denoiser of N(cond, S^2), one mean per item."""
    k = S**2 / (S**2 + _column(sigma, x) ** 2)
    return _column(cond, x) * (1 - k) + k * x


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond, **kwargs):
        self.calls.append({"batch": x.shape[0], "sigma": sigma, "cond": cond, **kwargs})
        return gaussian_given_mean(x, sigma, cond)


def run(name, denoiser, seeds=(1, 2, 3), steps=12, shape=(3, 2, 4)):
    sigmas = karras_sigmas(steps, SMIN, SMAX, RHO)
    return sample(name, denoiser, PerItemNoise(list(seeds)), shape, sigmas, cond=COND)


def test_cond_and_uncond_come_from_one_batched_forward():
    rec = Recorder()
    x = torch.randn(3, 5)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    ClassifierFreeGuidance(rec, UNCOND, 2.0)(x, sigma, COND, budget=20)
    (call,) = rec.calls
    assert call["batch"] == 6 and call["budget"] == 20
    torch.testing.assert_close(call["sigma"], torch.cat([sigma, sigma]))
    torch.testing.assert_close(call["cond"], torch.cat([COND, UNCOND]))


def test_cfg_scale_interpolates_and_extrapolates():
    x, sigma = torch.randn(3, 5), torch.full((3,), 0.8)
    d_c, d_u = gaussian_given_mean(x, sigma, COND), gaussian_given_mean(x, sigma, UNCOND)
    torch.testing.assert_close(ClassifierFreeGuidance(gaussian_given_mean, UNCOND, 0.0)(x, sigma, COND), d_u)
    torch.testing.assert_close(ClassifierFreeGuidance(gaussian_given_mean, UNCOND, 1.0)(x, sigma, COND), d_c)
    # Affine in the mean: w = 4.5 is the exact denoiser of N(4.5 c, S^2).
    torch.testing.assert_close(ClassifierFreeGuidance(gaussian_given_mean, UNCOND, 4.5)(x, sigma, COND),
                               gaussian_given_mean(x, sigma, 4.5 * COND))
    with pytest.raises(ValueError, match="finite"):
        ClassifierFreeGuidance(gaussian_given_mean, UNCOND, float("nan"))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_cfg_at_zero_and_one_is_the_unconditional_and_conditional_sampler(name):
    uncond_model = lambda x, sigma, cond: gaussian_given_mean(x, sigma, UNCOND)  # noqa: E731
    torch.testing.assert_close(run(name, ClassifierFreeGuidance(gaussian_given_mean, UNCOND, 0.0)),
                               run(name, uncond_model))
    torch.testing.assert_close(run(name, ClassifierFreeGuidance(gaussian_given_mean, UNCOND, 1.0)),
                               run(name, gaussian_given_mean))


def test_cfg_sampling_reaches_the_guided_distribution():
    n = 4000
    cond = torch.full((n,), 0.5)
    guided = ClassifierFreeGuidance(gaussian_given_mean, torch.zeros(n), 3.0)
    sigmas = karras_sigmas(64, SMIN, SMAX, RHO)
    g = torch.Generator().manual_seed(0)
    noise = lambda like: torch.randn(like.shape, generator=g)  # noqa: E731
    out = sample("dpmpp_2m_sde", guided, noise, (n, 8), sigmas, cond=cond)
    assert out.mean().item() == pytest.approx(1.5, abs=0.02)
    assert out.std().item() == pytest.approx(S, rel=0.03)


def test_cfgpp_returns_guided_data_and_unconditional_noise_terms():
    x, sigma = torch.randn(3, 5), torch.full((3,), 0.8)
    est = CFGPlusPlus(gaussian_given_mean, UNCOND, 0.8)(x, sigma, COND)
    assert isinstance(est, Estimate)
    torch.testing.assert_close(est.data, gaussian_given_mean(x, sigma, 0.8 * COND))
    torch.testing.assert_close(est.noise, gaussian_given_mean(x, sigma, UNCOND))
    with pytest.raises(ValueError, match=r"\[0, 1\].*ClassifierFreeGuidance"):
        CFGPlusPlus(gaussian_given_mean, UNCOND, 4.5)


def test_cfgpp_euler_step_is_the_method_formula():
    """x' = D_w + (sigma'/sigma)(x - D_u), for Euler and for DPM-Solver++(2M)'s first (first-order) step."""
    x = torch.randn(3, 5)
    sigmas = torch.tensor([2.0, 0.7])
    sig = torch.full((3,), 2.0)
    d_w, d_u = gaussian_given_mean(x, sig, 0.8 * COND), gaussian_given_mean(x, sig, UNCOND)
    expected = d_w + 0.7 / 2.0 * (x - d_u)
    for name in ["euler", "dpmpp_2m"]:
        out = SAMPLERS[name](CFGPlusPlus(gaussian_given_mean, UNCOND, 0.8), x, sigmas, cond=COND)
        torch.testing.assert_close(out, expected)


def test_cfgpp_heun_and_2m_steps_keep_guided_data_and_unconditional_noise():
    """The documented generalisation: Heun's trapezoid averages the unconditional slopes from the guided
    point D_w + sigma eps_u; 2M's second-order term extrapolates D_w from the previous D_w."""
    w, x = 0.8, torch.randn(3, 5)
    guided = CFGPlusPlus(gaussian_given_mean, UNCOND, w)

    def terms(x, sigma):
        sig = torch.full((3,), sigma)
        d_w, d_u = gaussian_given_mean(x, sig, w * COND), gaussian_given_mean(x, sig, UNCOND)
        return d_w, (x - d_u) / sigma

    d_w, eps = terms(x, 2.0)
    x_euler = d_w + 0.7 * eps
    _, eps_next = terms(x_euler, 0.7)
    heun = d_w + 2.0 * eps + (0.7 - 2.0) * (eps + eps_next) / 2
    torch.testing.assert_close(SAMPLERS["heun"](guided, x, torch.tensor([2.0, 0.7]), cond=COND), heun)

    levels = [2.0, 0.7, 0.2]
    d_w1, eps1 = terms(x, levels[0])
    x1 = d_w1 + levels[1] * eps1
    d_w2, eps2 = terms(x1, levels[1])
    h_prev, h = math.log(levels[0] / levels[1]), math.log(levels[1] / levels[2])
    ratio = levels[2] / levels[1]
    x2 = d_w2 + ratio * levels[1] * eps2 + (1 - ratio) / (2 * h_prev / h) * (d_w2 - d_w1)
    torch.testing.assert_close(SAMPLERS["dpmpp_2m"](guided, x, torch.tensor(levels), cond=COND), x2)


def test_cfgpp_euler_is_cfg_with_a_step_dependent_scale():
    """CFG++ Euler with w equals plain-CFG Euler with w_i = w sigma_i / (sigma_i - sigma_{i+1}) (CFG++ sec. 4)."""
    w = 0.6
    sigmas = karras_sigmas(10, SMIN, SMAX, RHO)
    levels = sigmas.tolist()
    scale_at = {round(a, 6): w * a / (a - b) for a, b in zip(levels, levels[1:])}

    def cfg_with_scheduled_scale(x, sigma, cond):
        scale = scale_at[round(float(sigma[0]), 6)]
        return ClassifierFreeGuidance(gaussian_given_mean, UNCOND, scale)(x, sigma, cond)

    x = SMAX * torch.randn(3, 6, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sample_euler(CFGPlusPlus(gaussian_given_mean, UNCOND, w), x, sigmas, cond=COND),
                               sample_euler(cfg_with_scheduled_scale, x, sigmas, cond=COND), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_cfgpp_at_zero_and_without_a_condition_is_the_plain_sampler(name):
    uncond_model = lambda x, sigma, cond: gaussian_given_mean(x, sigma, UNCOND)  # noqa: E731
    torch.testing.assert_close(run(name, CFGPlusPlus(gaussian_given_mean, UNCOND, 0.0)), run(name, uncond_model))
    # When the condition carries no information (D_c = D_u) every w gives the plain sampler.
    same = CFGPlusPlus(gaussian_given_mean, COND, 0.8)
    torch.testing.assert_close(run(name, same), run(name, gaussian_given_mean))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_cfgpp_at_one_still_renoises_with_the_unconditional_noise(name):
    """Documented: w = 1 is not the conditional sampler, because every step keeps the unconditional noise
    (its effective CFG scale exceeds 1). The consistency sampler re-noises with fresh noise only, so there
    CFG++ at w = 1 is the conditional sampler."""
    cond_run = run(name, gaussian_given_mean)
    cfgpp_run = run(name, CFGPlusPlus(gaussian_given_mean, UNCOND, 1.0))
    if name == "consistency":
        torch.testing.assert_close(cfgpp_run, cond_run)
        return
    # It overshoots toward the condition: items end further along c than the conditional sampler's.
    shift = (cfgpp_run - cond_run).mean(dim=(1, 2))
    assert bool((shift * torch.sign(COND) > 0.05).all())


@pytest.mark.parametrize("name, nfe", [("heun", 2 * 11), ("dpmpp_2m", 2 * 6), ("consistency", 2 * 6)])
def test_nfe_counts_both_guided_evaluations(name, nfe):
    counter = NFECounter(CFGPlusPlus(gaussian_given_mean, UNCOND, 0.8))
    run(name, counter, steps=6)
    assert counter.nfe == nfe


def test_concat_cond_handles_structures_and_rejects_mismatches():
    cond = {"text": torch.ones(2, 4, 3), "mask": (torch.ones(2, 4), torch.zeros(2))}
    uncond = {"text": torch.zeros(2, 4, 3), "mask": (torch.zeros(2, 4), torch.ones(2))}
    both = concat_cond(cond, uncond)
    assert both["text"].shape == (4, 4, 3) and both["mask"][0].shape == (4, 4)
    torch.testing.assert_close(both["mask"][1], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        concat_cond(torch.ones(2, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="keys"):
        concat_cond({"a": torch.ones(1)}, {"b": torch.ones(1)})
    with pytest.raises(TypeError, match="str"):
        concat_cond("castle, fantasy", "")


def test_guided_denoisers_accept_a_shared_scalar_sigma():
    x = torch.randn(3, 5)
    out = ClassifierFreeGuidance(gaussian_given_mean, UNCOND, 2.0)(x, 0.8, COND)
    torch.testing.assert_close(out, gaussian_given_mean(x, torch.full((3,), 0.8), 2.0 * COND))
    assert math.isclose(CFGPlusPlus(gaussian_given_mean, UNCOND, 1.0).scale, 1.0)
