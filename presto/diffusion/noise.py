"""Noise-level distributions: where in sigma a training example (or a distillation target) is drawn.

Presto-S uses four of them (p_gen, p_DMD, p_DSM, p_GAN), each a choice between

- sigma^train, the EDM log-normal:  ln sigma ~ N(P_mean, P_std^2), truncated to [sigma_min, sigma_max];
- sigma^inf, the continuous version of the Karras inference grid:
      u ~ U[0, 1],  sigma = (smax^(1/rho) + u (smin^(1/rho) - smax^(1/rho)))^rho.

The paper calls the choice "critical" and ablates it (Table 1), so every role is a `NoiseDistConfig` in
params.yaml (presto/config.py): a row of the ablation is a params change, `make_noise_dist` turns it into an
object with `sample(n, generator=None, device=None) -> Tensor` of shape (n,), float32.

Draws happen on the generator's device (the CPU one when no generator is given) and in float64, then move
to `device`: a seed gives the same sigmas on any machine, and n scalars cost nothing to copy.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from presto.config import InferenceSigmaConfig, MixtureSigmaConfig, NoiseDistConfig, TrainSigmaConfig


def rho_schedule(u: Tensor, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """Karras et al. (2022) eq. 5 as a map of u in [0, 1]: u = 0 gives sigma_max, u = 1 gives sigma_min.

    sigma(u) = (smax^(1/rho) + u (smin^(1/rho) - smax^(1/rho)))^rho. Large rho spends more of [0, 1] at
    low noise; rho -> infinity tends to the geometric (log-linear) schedule, rho = 1 is linear in sigma.
    """
    _check_schedule(sigma_min, sigma_max, rho)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + u * (lo - hi)) ** rho


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min = {sigma_min}, sigma_max = {sigma_max}: need 0 < sigma_min < sigma_max")


def _check_schedule(sigma_min: float, sigma_max: float, rho: float) -> None:
    _check_range(sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho = {rho}: must be > 0")


def _uniform(n: int, generator: torch.Generator | None) -> Tensor:
    if n < 0:
        raise ValueError(f"n = {n}: cannot draw a negative number of noise levels")
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=where, dtype=torch.float64)


class NoiseDist(Protocol):
    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor: ...


class LogNormalSigma:
    """sigma^train: ln sigma ~ N(p_mean, p_std^2) *truncated* (not clipped) to [sigma_min, sigma_max].

    Truncation by inverse CDF: u ~ U[Phi(a), Phi(b)], ln sigma = p_mean + p_std Phi^-1(u) with
    a, b the standardised log bounds. Clipping would put point masses on the bounds; truncation keeps the
    log-normal's shape inside them (with EDM's -0.4/1.0 and [0.002, 80] less than 1e-6 of the mass is
    outside, so the two agree there; they differ for tight bounds).
    """

    def __init__(self, p_mean: float, p_std: float, sigma_min: float, sigma_max: float):
        _check_range(sigma_min, sigma_max)
        if p_std <= 0:
            raise ValueError(f"p_std = {p_std}: must be > 0")
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        u = _uniform(n, generator)
        bounds = torch.tensor([self.sigma_min, self.sigma_max], dtype=torch.float64, device=u.device)
        cdf_lo, cdf_hi = torch.special.ndtr((bounds.log() - self.p_mean) / self.p_std)
        z = torch.special.ndtri(cdf_lo + u * (cdf_hi - cdf_lo))
        sigma = (self.p_mean + self.p_std * z).exp()
        # ndtri is inexact where the CDF is within float64 epsilon of 0 or 1: keep the bounds exact.
        return sigma.clamp(self.sigma_min, self.sigma_max).to(device=device, dtype=torch.float32)


class InferenceSigma:
    """sigma^inf: the Karras rho schedule at a uniform random position, u ~ U[0, 1] (Presto! sec. 3.2)."""

    def __init__(self, sigma_min: float, sigma_max: float, rho: float):
        _check_schedule(sigma_min, sigma_max, rho)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        sigma = rho_schedule(_uniform(n, generator), self.sigma_min, self.sigma_max, self.rho)
        return sigma.to(device=device, dtype=torch.float32)


class MixtureSigma:
    """Each draw picks component k with probability weight_k / sum(weights), then samples it."""

    def __init__(self, components: list[tuple[float, NoiseDist]]):
        if not components:
            raise ValueError("MixtureSigma needs at least one (weight, distribution) component")
        weights = [float(w) for w, _ in components]
        if any(w <= 0 for w in weights):
            raise ValueError(f"mixture weights {weights}: every weight must be > 0")
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.dists = [d for _, d in components]

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        where = generator.device if generator is not None else torch.device("cpu")
        if n == 0:
            return torch.empty(0, dtype=torch.float32, device=device)
        which = torch.multinomial(self.weights.to(where), n, replacement=True, generator=generator)
        sigma = torch.empty(n, dtype=torch.float32, device=where)
        for k, dist in enumerate(self.dists):
            chosen = which == k
            sigma[chosen] = dist.sample(int(chosen.sum()), generator=generator, device=where)
        return sigma.to(device)


# ---- from params --------------------------------------------------------------------------------------


def make_noise_dist(cfg: NoiseDistConfig) -> NoiseDist:
    if isinstance(cfg, TrainSigmaConfig):
        return LogNormalSigma(cfg.p_mean, cfg.p_std, cfg.sigma_min, cfg.sigma_max)
    if isinstance(cfg, InferenceSigmaConfig):
        return InferenceSigma(cfg.sigma_min, cfg.sigma_max, cfg.rho)
    if isinstance(cfg, MixtureSigmaConfig):
        return MixtureSigma([(c.weight, make_noise_dist(c.dist)) for c in cfg.components])
    raise TypeError(f"not a noise distribution config: {type(cfg).__name__}")
