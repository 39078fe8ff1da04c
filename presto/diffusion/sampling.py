"""Samplers for EDM denoisers, in the style of k-diffusion's sampling.py (our own code and derivations).

A denoiser is any callable `denoiser(x, sigma, cond) -> x0_hat` with sigma of shape (batch,). It returns
a Tensor, or an `Estimate(data, noise)` when the x0 estimate of the data term and the one that defines the
noise direction differ (CFG++, see guidance.py). Every sampler below is written in terms of that pair:

    x0  = estimate.data                      (where the step is heading)
    eps = (x - estimate.noise) / sigma       (the noise the step keeps, rescaled to the next sigma)

For a plain denoiser x = x0 + sigma eps exactly and the formulas are the textbook ones; with CFG++ they
become CFG++'s (guided data term, unconditional noise term) without a second copy of each sampler.

The probability-flow ODE in EDM's variance-exploding form (sigma(t) = t) is dx/dsigma = (x - D(x; sigma))/sigma
= eps. With lambda = -ln(sigma) it reads dx/dlambda = D - x, whose exact solution over a step
h = ln(sigma / sigma') is the exponential integrator used by DPM-Solver++:

    x' = e^-h x + integral_0^h e^-(h-u) D(lambda + u) du.

`sigmas` is a decreasing 1-D tensor of noise levels, usually ending with 0 (`karras_sigmas`); the sampler
starts at x (already scaled by sigmas[0]) and returns the sample at sigmas[-1].

Randomness comes from a `noise` callable returning N(0, I) shaped like its argument. `PerItemNoise` draws
each batch item from its own seeded generator, so a sample does not depend on what else shares its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from presto.diffusion.noise import rho_schedule

# ---- schedules ----------------------------------------------------------------------------------------


def karras_sigmas(
    n: int, sigma_min: float, sigma_max: float, rho: float, device: torch.device | str = "cpu"
) -> Tensor:
    """n noise levels from sigma_max down to sigma_min on the rho grid (Karras et al. 2022, eq. 5), then 0.

    sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, i = 0..n-1; shape (n + 1,).
    """
    if n < 1:
        raise ValueError(f"n = {n}: need at least one noise level")
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = torch.cat([rho_schedule(u, sigma_min, sigma_max, rho), u.new_zeros(1)])
    return sigmas.to(device=device, dtype=torch.float32)


def consistency_sigmas(
    n: int, sigma_min: float, sigma_max: float, rho: float, device: torch.device | str = "cpu"
) -> Tensor:
    """Step sigmas for `sample_consistency`: the rho grid at u = i/n, i = 0..n-1, then 0. Shape (n + 1,).

    The paper takes the steps from a rho schedule without saying where the last one lands [ours]: a grid
    ending at sigma_min would spend the last network call re-denoising an almost clean sample, so the n
    steps are the first n of n+1 points from sigma_max to sigma_min (as few-step generators do with
    timesteps T, 3T/4, T/2, T/4). n = 1 is the one-step generator at sigma_max. Larger rho puts the later
    steps at lower noise: less re-noising, more quality, less diversity (the paper's rho = 7 vs 1000 knob).
    """
    if n < 1:
        raise ValueError(f"n = {n}: need at least one step")
    u = torch.arange(n, dtype=torch.float64) / n
    sigmas = torch.cat([rho_schedule(u, sigma_min, sigma_max, rho), u.new_zeros(1)])
    return sigmas.to(device=device, dtype=torch.float32)


def _levels(sigmas: Tensor) -> list[float]:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 levels, got shape {tuple(sigmas.shape)}")
    levels = [float(s) for s in sigmas.tolist()]
    if any(a <= b for a, b in zip(levels, levels[1:])) or levels[-2] <= 0 or levels[-1] < 0:
        raise ValueError(f"sigmas must be strictly decreasing, positive, with only the last allowed to be 0: {levels}")
    return levels


# ---- denoiser and noise interfaces --------------------------------------------------------------------


class Estimate(NamedTuple):
    """Two x0 estimates at one point: `data` for the data term, `noise` for eps = (x - noise) / sigma."""

    data: Tensor
    noise: Tensor


class DenoiseFn(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor | Estimate: ...


def _denoise(denoiser: DenoiseFn, x: Tensor, sigma: float, cond: Any) -> Estimate:
    out = denoiser(x, x.new_full((x.shape[0],), sigma), cond)
    return out if isinstance(out, Estimate) else Estimate(out, out)


NoiseSource = Callable[[Tensor], Tensor]
"""noise(like) -> a standard normal tensor with like's shape, dtype and device."""


class PerItemNoise:
    """N(0, I) noise with one seeded generator per batch item.

    Item k's draws depend only on seeds[k] and on how many draws came before (the same for every item of
    a sampler run), so an item gives the same sample alone or in any batch. Draws are made on the CPU in
    float32 and then moved, so a seed means the same noise on every device.
    """

    def __init__(self, seeds: Sequence[int]):
        if len(seeds) == 0:
            raise ValueError("PerItemNoise needs one seed per batch item, got none")
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def __call__(self, like: Tensor) -> Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {like.shape[0]} items but {len(self.generators)} seeds")
        draws = [torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(device=like.device, dtype=like.dtype)


@dataclass(frozen=True)
class Step:
    """What a callback sees after each evaluation: the point x at noise level sigma and its x0 estimate."""

    i: int
    sigma: float
    x: Tensor
    denoised: Tensor


Callback = Callable[[Step], None]


def _report(callback: Callback | None, i: int, sigma: float, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(Step(i, sigma, x, denoised))


def _check_eta(eta: float) -> None:
    if eta < 0:
        raise ValueError(f"eta = {eta}: must be >= 0 (0 is the ODE, 1 the reverse SDE)")


# ---- samplers -----------------------------------------------------------------------------------------
# Every sampler has the signature (denoiser, x, sigmas, *, cond, noise=None, callback=None, ...), so that
# they swap by name; deterministic ones draw no noise.


@torch.no_grad()
def sample_euler(
    denoiser: DenoiseFn, x: Tensor, sigmas: Tensor, *, cond: Any,
    noise: NoiseSource | None = None, callback: Callback | None = None,
) -> Tensor:
    """Euler on the PF-ODE (EDM eq. 3): x' = x + (sigma' - sigma) eps = x0 + sigma' eps. NFE = steps.

    (In sigma-space this is also DDIM / first-order DPM-Solver++.)
    """
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        est = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, est.data)
        eps = (x - est.noise) / sigma
        x = est.data + sigma_next * eps
    return x


@torch.no_grad()
def sample_heun(
    denoiser: DenoiseFn, x: Tensor, sigmas: Tensor, *, cond: Any,
    noise: NoiseSource | None = None, callback: Callback | None = None,
) -> Tensor:
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Algorithm 1, no churn).

    Euler predictor x_e = x0 + sigma' eps, then the trapezoid x' = x + (sigma' - sigma)(eps + eps_e) / 2
    with eps_e the slope at (x_e, sigma'). The step to sigma' = 0 stays Euler (eps is undefined at 0).
    NFE = 2 steps - 1 when the grid ends at 0.
    """
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        est = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, est.data)
        eps = (x - est.noise) / sigma
        x_euler = est.data + sigma_next * eps
        if sigma_next == 0:
            x = x_euler
            continue
        est_next = _denoise(denoiser, x_euler, sigma_next, cond)
        eps_next = (x_euler - est_next.noise) / sigma_next
        # x0 + sigma eps is x itself for a plain denoiser, CFG++'s guided point otherwise.
        x = est.data + sigma * eps + (sigma_next - sigma) * (eps + eps_next) / 2
    return x


def _dpmpp_2m(
    denoiser: DenoiseFn, x: Tensor, sigmas: Tensor, cond: Any, noise: NoiseSource | None,
    callback: Callback | None, eta: float,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) and its SDE form (eta > 0), midpoint variant.

    With h = ln(sigma / sigma') and a = e^-(1+eta)h = (sigma'/sigma)^(1+eta):
        x' = a x + (1 - a) x0  +  (1 - a) / (2r) (x0 - x0_prev)  +  sigma' sqrt(1 - e^-2 eta h) z
    where a x + (1 - a) x0 = x0 + a sigma eps, r = h_prev / h, z ~ N(0, I). The first step and the step to
    sigma' = 0 are first order (the step to 0 returns x0).
    """
    _check_eta(eta)
    draw = noise if noise is not None else torch.randn_like
    levels = _levels(sigmas)
    x0_prev, h_prev = None, None
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        est = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, est.data)
        x0 = est.data
        if sigma_next == 0:
            x = x0
            continue
        eps = (x - est.noise) / sigma
        h = math.log(sigma / sigma_next)
        a = math.exp(-(1 + eta) * h)
        x = x0 + a * sigma * eps
        if x0_prev is not None:
            r = h_prev / h
            x = x + (1 - a) / (2 * r) * (x0 - x0_prev)
        if eta > 0:
            x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * draw(x)
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: DenoiseFn, x: Tensor, sigmas: Tensor, *, cond: Any,
    noise: NoiseSource | None = None, callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M), deterministic multistep 2nd order (`_dpmpp_2m` with eta = 0). NFE = steps."""
    return _dpmpp_2m(denoiser, x, sigmas, cond, noise, callback, eta=0.0)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: DenoiseFn, x: Tensor, sigmas: Tensor, *, cond: Any,
    noise: NoiseSource | None = None, callback: Callback | None = None, eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE (`_dpmpp_2m`); eta = 1 is the reverse SDE, eta = 0 the ODE. NFE = steps."""
    return _dpmpp_2m(denoiser, x, sigmas, cond, noise, callback, eta=eta)


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: DenoiseFn, x: Tensor, sigmas: Tensor, *, cond: Any,
    noise: NoiseSource | None = None, callback: Callback | None = None, eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE: exponential integrator with a quadratic fit of x0 over the last three steps.

    With K = (1+eta) h, a = e^-K and v = u/h, fit x0(v) = x0 + slope v + curv v^2 through the current and
    two previous estimates (at v = 0, -r0, -(r0 + r1), r_j = h_j / h). The exact integral of the fit gives
        x' = a x + (1 - a) x0 + phi2 slope + phi3 curv + sigma' sqrt(1 - e^-2 eta h) z,
        phi2 = int_0^1 K e^-K(1-v) v dv   = 1 - (1 - a) / K,
        phi3 = int_0^1 K e^-K(1-v) v^2 dv = 1 - 2 phi2 / K.
    (k-diffusion / DPM-Solver weight `curv` by phi3 / 2, which leaves the method second order; the exact
    weight is phi3.) Steps with one previous estimate use the linear fit, the first step none.
    NFE = steps.
    """
    _check_eta(eta)
    draw = noise if noise is not None else torch.randn_like
    levels = _levels(sigmas)
    history: list[tuple[Tensor, float]] = []  # (x0, h) of earlier steps, newest first
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        est = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, x, est.data)
        x0 = est.data
        if sigma_next == 0:
            x = x0
            continue
        eps = (x - est.noise) / sigma
        h = math.log(sigma / sigma_next)
        big_k = (1 + eta) * h
        a = math.exp(-big_k)
        phi2 = 1 + math.expm1(-big_k) / big_k
        x = x0 + a * sigma * eps
        if len(history) >= 2:
            (x0_1, h_1), (x0_2, h_2) = history[0], history[1]
            r0, r1 = h_1 / h, h_2 / h
            diff_0 = (x0 - x0_1) / r0  # divided differences in v
            diff_1 = (x0_1 - x0_2) / r1
            curv = (diff_0 - diff_1) / (r0 + r1)
            slope = diff_0 + curv * r0
            phi3 = 1 - 2 * phi2 / big_k
            x = x + phi2 * slope + phi3 * curv
        elif history:
            x0_1, h_1 = history[0]
            x = x + phi2 * (x0 - x0_1) / (h_1 / h)
        if eta > 0:
            x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * draw(x)
        history = [(x0, h)] + history[:1]
    return x


@torch.no_grad()
def sample_consistency(
    denoiser: DenoiseFn, x: Tensor, sigmas: Tensor, *, cond: Any,
    noise: NoiseSource | None = None, callback: Callback | None = None,
) -> Tensor:
    """Presto-S / consistency-model multistep sampling (Presto! sec. 3.2; Song et al. 2023, Alg. 1).

    x starts as sigma_0 eps. Each step: x_hat = G(x, sigma_i); if a positive sigma_{i+1} follows,
    x = x_hat + sigma_{i+1} z with fresh z ~ N(0, I); otherwise x_hat is the sample. Use
    `consistency_sigmas` for the step levels. NFE = steps.
    """
    draw = noise if noise is not None else torch.randn_like
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x_hat = _denoise(denoiser, x, sigma, cond).data
        _report(callback, i, sigma, x, x_hat)
        x = x_hat + sigma_next * draw(x_hat) if sigma_next > 0 else x_hat
    return x


Sampler = Callable[..., Tensor]

SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "consistency": sample_consistency,
}


def sample(
    name: str, denoiser: DenoiseFn, noise: NoiseSource, shape: Sequence[int], sigmas: Tensor, *, cond: Any,
    device: torch.device | str = "cpu", callback: Callback | None = None, **options: Any,
) -> Tensor:
    """Draw x = sigmas[0] * noise of `shape` (batch first) and run the sampler called `name` from there.

    `options` go to the sampler (e.g. eta for the SDE samplers).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    x = float(sigmas[0]) * noise(torch.zeros(tuple(shape), device=device))
    return SAMPLERS[name](denoiser, x, sigmas, cond=cond, noise=noise, callback=callback, **options)
