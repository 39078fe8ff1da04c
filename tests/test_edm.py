"""EDM preconditioning and loss against their defining properties and the exact Gaussian denoiser."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from presto.diffusion.edm import Denoiser, c_in, c_noise, c_out, c_skip, edm_loss, loss_weight, per_item_sigma

SD = 0.5
SIGMAS = torch.tensor([0.002, 0.05, 0.5, 2.0, 80.0], dtype=torch.float64)


def test_coefficients_at_analytic_points():
    sd = torch.tensor(SD, dtype=torch.float64)
    assert c_skip(sd, SD).item() == pytest.approx(0.5)
    assert c_out(sd, SD).item() == pytest.approx(SD / math.sqrt(2))
    assert c_in(sd, SD).item() == pytest.approx(1 / (SD * math.sqrt(2)))
    assert c_noise(torch.tensor(math.exp(4.0))).item() == pytest.approx(1.0)
    tiny, huge = torch.tensor(1e-6, dtype=torch.float64), torch.tensor(1e6, dtype=torch.float64)
    # sigma -> 0: D is the identity; sigma -> infinity: D ignores x and F predicts x0 / sd.
    assert c_skip(tiny, SD).item() == pytest.approx(1.0) and c_out(tiny, SD).item() == pytest.approx(0, abs=1e-5)
    assert c_skip(huge, SD).item() == pytest.approx(0, abs=1e-9) and c_out(huge, SD).item() == pytest.approx(SD)


def test_loss_weight_is_inverse_squared_output_scale():
    torch.testing.assert_close(loss_weight(SIGMAS, SD) * c_out(SIGMAS, SD) ** 2, torch.ones_like(SIGMAS))
    torch.testing.assert_close(loss_weight(SIGMAS, SD), (SIGMAS**2 + SD**2) / (SIGMAS * SD) ** 2)


@pytest.mark.parametrize("data", ["gaussian", "uniform"])
def test_network_input_and_target_have_unit_variance(data):
    """EDM's design rule: for data of std sigma_data, F's input and its regression target have variance 1."""
    g = torch.Generator().manual_seed(0)
    n = 400_000
    for sigma in SIGMAS.tolist():
        if data == "gaussian":
            x0 = SD * torch.randn(n, generator=g, dtype=torch.float64)
        else:
            x0 = SD * math.sqrt(3) * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
        y = x0 + sigma * torch.randn(n, generator=g, dtype=torch.float64)
        s = torch.tensor(sigma, dtype=torch.float64)
        target = (x0 - c_skip(s, SD) * y) / c_out(s, SD)
        assert (c_in(s, SD) * y).var().item() == pytest.approx(1.0, abs=0.01)
        assert target.var().item() == pytest.approx(1.0, abs=0.01)


def gaussian_posterior_mean(x, sigma, mu, s):
    """E[x0 | x0 + sigma eps = x] for x0 ~ N(mu, s^2)."""
    return mu + s**2 / (s**2 + sigma**2) * (x - mu)


class OracleNet(nn.Module):
    """F that inverts the preconditioning (x = x_in / c_in, sigma = exp(4 c_noise)) and returns the exact
    target for N(mu, s^2) data: if D then equals the posterior mean, c_in, c_noise, c_skip and c_out fit."""

    def __init__(self, mu: float, s: float):
        super().__init__()
        self.mu, self.s = mu, s
        self.seen: dict = {}

    def forward(self, x_in, noise_level, cond, **kwargs):
        self.seen = {"dtype": x_in.dtype, "cond": cond, **kwargs}
        sigma = torch.exp(4 * noise_level).reshape(-1, *([1] * (x_in.ndim - 1)))
        x = x_in / c_in(sigma, SD)
        return (gaussian_posterior_mean(x, sigma, self.mu, self.s) - c_skip(sigma, SD) * x) / c_out(sigma, SD)


def test_denoiser_reproduces_the_exact_gaussian_denoiser():
    net = OracleNet(mu=0.3, s=0.8)
    den = Denoiser(net, sigma_data=SD)
    x = torch.randn(5, 2, 7, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 60.0])
    expected = gaussian_posterior_mean(x, sigma.reshape(-1, 1, 1), 0.3, 0.8)
    torch.testing.assert_close(den(x, sigma, None), expected, rtol=1e-4, atol=1e-5)


def test_denoiser_sigma_broadcast_dtype_and_kwargs():
    net = OracleNet(mu=0.0, s=SD)
    den = Denoiser(net, sigma_data=SD)
    x = torch.randn(3, 4)
    shared = den(x, 0.7, "text", budget=12)
    torch.testing.assert_close(shared, den(x, torch.full((3,), 0.7), "text"))
    torch.testing.assert_close(shared, den(x, torch.tensor(0.7), "text"))
    assert net.seen["cond"] == "text"
    assert den(x.to(torch.bfloat16), 0.7, None, budget=12).dtype == torch.float32
    assert net.seen["dtype"] == torch.float32 and net.seen["budget"] == 12
    with pytest.raises(ValueError, match=r"sigma has shape \(2,\)"):
        den(x, torch.ones(2), None)
    with pytest.raises(ValueError, match="sigma_data"):
        Denoiser(net, sigma_data=0.0)
    assert per_item_sigma(2.0, x).shape == (3,)


class ZeroNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x_in, noise_level, cond):
        return self.scale * x_in


def test_loss_of_a_zero_network_is_one_for_unit_scaled_data():
    """F = 0 leaves the whole unit-variance target as error, and lambda makes it exactly 1 at every sigma."""
    g = torch.Generator().manual_seed(2)
    x0 = SD * torch.randn(len(SIGMAS), 100_000, generator=g)
    loss = edm_loss(Denoiser(ZeroNet(), SD), x0, SIGMAS.float(), None, torch.randn(x0.shape, generator=g))
    assert loss.shape == (len(SIGMAS),)
    torch.testing.assert_close(loss, torch.ones(len(SIGMAS)), rtol=0.02, atol=0)


def test_loss_of_the_optimal_denoiser_is_the_weighted_posterior_variance():
    """With D the posterior mean of N(0, s^2) data, E||D - x0||^2 = s^2 sigma^2 / (s^2 + sigma^2)."""
    s = 1.3
    g = torch.Generator().manual_seed(3)
    x0 = s * torch.randn(len(SIGMAS), 2, 100_000, generator=g)
    loss = edm_loss(Denoiser(OracleNet(0.0, s), SD), x0, SIGMAS.float(), None, torch.randn(x0.shape, generator=g))
    posterior_var = s**2 * SIGMAS**2 / (s**2 + SIGMAS**2)
    torch.testing.assert_close(loss.double(), loss_weight(SIGMAS, SD) * posterior_var, rtol=0.02, atol=0)


def test_loss_backpropagates_to_the_network():
    net = ZeroNet()
    x0 = torch.randn(4, 8)
    edm_loss(Denoiser(net, SD), x0, torch.full((4,), 0.5), None, torch.randn(4, 8)).mean().backward()
    assert net.scale.grad is not None and net.scale.grad.item() != 0
