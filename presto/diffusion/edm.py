"""EDM preconditioning and loss (Karras et al. 2022, "Elucidating the Design Space...", Table 1 / eq. 7-8).

The raw network F never sees x or sigma directly:

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

    c_skip  = sd^2 / (sigma^2 + sd^2)          c_out = sigma sd / sqrt(sigma^2 + sd^2)
    c_in    = 1 / sqrt(sigma^2 + sd^2)         c_noise = ln(sigma) / 4

with sd = sigma_data. For data of std sd, F's input c_in (x0 + sigma eps) and its regression target
(x0 - c_skip (x0 + sigma eps)) / c_out both have unit variance at every sigma, and the loss weight
lambda = 1 / c_out^2 = (sigma^2 + sd^2) / (sigma sd)^2 makes the loss on F unit-weighted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def c_skip(sigma: Tensor, sigma_data: float) -> Tensor:
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: Tensor, sigma_data: float) -> Tensor:
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: Tensor, sigma_data: float) -> Tensor:
    return 1 / (sigma**2 + sigma_data**2).sqrt()


def c_noise(sigma: Tensor) -> Tensor:
    return sigma.log() / 4


def loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def per_item_sigma(sigma: float | Tensor, x: Tensor) -> Tensor:
    """sigma as a float32 vector of shape (batch,) on x's device: a scalar is shared by every item."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    batch = x.shape[0]
    if sigma.numel() == 1:
        return sigma.reshape(1).repeat(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected a scalar or ({batch},) for x of shape "
                         f"{tuple(x.shape)}")
    return sigma


def _as_column(sigma: Tensor, ndim: int) -> Tensor:
    return sigma.reshape(-1, *([1] * (ndim - 1)))


class Denoiser(nn.Module):
    """D(x, sigma, cond, **kw) -> x0_hat around a raw network F(x_in, c_noise, cond, **kw).

    sigma is a scalar or one value per batch item; the preconditioning runs in float32 (as EDM does:
    c_skip x must not lose the low-noise detail that bf16 would round away) and the output is float32.
    sigma must be > 0 (c_noise = ln(sigma) / 4); samplers never evaluate at sigma = 0.
    Extra keyword arguments reach F untouched (a layer budget, a request for hidden states, ...).
    """

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data = {sigma_data}: must be > 0")
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, sigma: float | Tensor, cond: Any, **net_kwargs: Any) -> Tensor:
        sigma = per_item_sigma(sigma, x)
        s = _as_column(sigma, x.ndim)
        x = x.to(torch.float32)
        f = self.net(c_in(s, self.sigma_data) * x, c_noise(sigma), cond, **net_kwargs)
        return c_skip(s, self.sigma_data) * x + c_out(s, self.sigma_data) * f.to(torch.float32)


def edm_loss(denoiser: Denoiser, x0: Tensor, sigma: Tensor, cond: Any, noise: Tensor, **net_kwargs: Any) -> Tensor:
    """Per-item EDM loss, shape (batch,): lambda(sigma) * mean over elements of (D(x0 + sigma eps; sigma) - x0)^2.

    The mean (not the sum) over elements keeps the scale independent of latent size; `noise` is eps ~ N(0, I)
    drawn by the caller, so that the caller owns the randomness.
    """
    sigma = per_item_sigma(sigma, x0)
    x0 = x0.to(torch.float32)
    noisy = x0 + _as_column(sigma, x0.ndim) * noise.to(torch.float32)
    err = (denoiser(noisy, sigma, cond, **net_kwargs) - x0) ** 2
    return loss_weight(sigma, denoiser.sigma_data) * err.flatten(1).mean(dim=1)
