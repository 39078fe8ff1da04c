"""Noise-level distributions: sigma^inf, the truncated log-normal sigma^train, mixtures, and their params."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError
from scipy import stats

from presto.config import Section
from presto.diffusion.noise import (
    InferenceSigma,
    LogNormalSigma,
    MixtureSigma,
    NoiseDistConfig,
    make_noise_dist,
    rho_schedule,
)

SMIN, SMAX, RHO = 0.002, 80.0, 7.0
N = 200_000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rho_schedule_endpoints_monotone_and_limits():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = rho_schedule(u, SMIN, SMAX, RHO)
    assert s[0].item() == pytest.approx(SMAX, rel=1e-12)
    assert s[-1].item() == pytest.approx(SMIN, rel=1e-12)
    assert bool((s[1:] < s[:-1]).all())
    # rho = 1 is linear in sigma; rho -> infinity is geometric (linear in log sigma).
    torch.testing.assert_close(rho_schedule(u, SMIN, SMAX, 1.0), SMAX + u * (SMIN - SMAX))
    geometric = torch.exp(math.log(SMAX) + u * (math.log(SMIN) - math.log(SMAX)))
    torch.testing.assert_close(rho_schedule(u, SMIN, SMAX, 1e6), geometric, rtol=1e-4, atol=0)


@pytest.mark.parametrize("bad", [dict(sigma_min=0.0), dict(sigma_min=90.0), dict(rho=0.0)])
def test_rho_schedule_rejects_bad_arguments(bad):
    args = dict(sigma_min=SMIN, sigma_max=SMAX, rho=RHO) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        InferenceSigma(**args)


def test_inference_sigma_is_the_rho_map_of_a_uniform():
    s = InferenceSigma(SMIN, SMAX, RHO).sample(N, generator=gen())
    assert s.dtype == torch.float32 and s.shape == (N,)
    assert float(s.min()) >= SMIN and float(s.max()) <= SMAX
    # Invert the map: u = (smax^(1/rho) - s^(1/rho)) / (smax^(1/rho) - smin^(1/rho)) must be U[0, 1].
    hi, lo = SMAX ** (1 / RHO), SMIN ** (1 / RHO)
    u = ((hi - s.double() ** (1 / RHO)) / (hi - lo)).numpy()
    assert stats.kstest(u, "uniform").statistic < 0.005
    # Median of sigma^inf is the schedule at u = 1/2.
    mid = rho_schedule(torch.tensor(0.5, dtype=torch.float64), SMIN, SMAX, RHO).item()
    assert float(s.median()) == pytest.approx(mid, rel=0.02)


def test_lognormal_moments_with_paper_values():
    s = LogNormalSigma(-0.4, 1.0, SMIN, SMAX).sample(N, generator=gen())
    log_s = s.double().log()
    # [0.002, 80] is -5.8 / +4.8 standard deviations: the truncation is invisible at this precision.
    assert log_s.mean().item() == pytest.approx(-0.4, abs=4 / math.sqrt(N))
    assert log_s.std().item() == pytest.approx(1.0, abs=0.01)


def test_lognormal_is_truncated_not_clipped():
    lo, hi = math.exp(-1.0), math.exp(0.5)
    s = LogNormalSigma(-0.4, 1.0, lo, hi).sample(N, generator=gen(1))
    log_s = s.double().log().numpy()
    ref = stats.truncnorm((-1.0 + 0.4) / 1.0, (0.5 + 0.4) / 1.0, loc=-0.4, scale=1.0)
    assert log_s.mean() == pytest.approx(ref.mean(), abs=0.005)
    assert log_s.var() == pytest.approx(ref.var(), rel=0.02)
    assert stats.kstest(log_s, ref.cdf).statistic < 0.005
    # Clipping would put the 46 % of the mass outside [lo, hi] exactly on the bounds.
    at_bounds = ((s <= lo * (1 + 1e-6)) | (s >= hi * (1 - 1e-6))).double().mean().item()
    assert at_bounds < 1e-3


def test_sampling_is_reproducible_and_moves_to_the_device():
    dist = LogNormalSigma(-0.4, 1.0, SMIN, SMAX)
    torch.testing.assert_close(dist.sample(64, generator=gen(3)), dist.sample(64, generator=gen(3)))
    assert not torch.equal(dist.sample(64, generator=gen(3)), dist.sample(64, generator=gen(4)))
    assert dist.sample(5, device="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="negative"):
        dist.sample(-1)


def test_mixture_picks_components_by_weight():
    low = LogNormalSigma(-5.5, 0.5, 0.002, 0.01)
    high = InferenceSigma(1.0, 80.0, 7.0)
    s = MixtureSigma([(1.0, low), (3.0, high)]).sample(N, generator=gen(5))
    assert bool(((s <= 0.01) | (s >= 1.0)).all())
    assert (s >= 1.0).double().mean().item() == pytest.approx(0.75, abs=0.005)
    assert MixtureSigma([(1.0, high)]).sample(0).shape == (0,)
    with pytest.raises(ValueError, match="weight"):
        MixtureSigma([(0.0, high)])
    with pytest.raises(ValueError, match="at least one"):
        MixtureSigma([])


TRAIN = {"kind": "train", "p_mean": -0.4, "p_std": 1.0, "sigma_min": SMIN, "sigma_max": SMAX}
INF = {"kind": "inf", "sigma_min": SMIN, "sigma_max": SMAX, "rho": RHO}


class PrestoSNoise(Section):
    """The four Presto-S roles, as a distillation params section would hold them."""

    p_gen: NoiseDistConfig
    p_dmd: NoiseDistConfig
    p_dsm: NoiseDistConfig
    p_gan: NoiseDistConfig


def test_every_table1_row_is_a_params_change():
    paper = PrestoSNoise.model_validate({"p_gen": INF, "p_dmd": TRAIN, "p_dsm": TRAIN, "p_gan": TRAIN})
    dists = {role: make_noise_dist(getattr(paper, role)) for role in PrestoSNoise.model_fields}
    assert isinstance(dists["p_gen"], InferenceSigma) and isinstance(dists["p_dmd"], LogNormalSigma)
    ablation = {"p_gen": TRAIN, "p_dmd": INF, "p_gan": INF,
                "p_dsm": {"kind": "mixture", "components": [{"weight": 1, "dist": TRAIN}, {"weight": 1, "dist": INF}]}}
    row = PrestoSNoise.model_validate(ablation)
    assert isinstance(make_noise_dist(row.p_gen), LogNormalSigma)
    mixture = make_noise_dist(row.p_dsm)
    assert isinstance(mixture, MixtureSigma) and len(mixture.dists) == 2


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (TRAIN | {"sigma_min": 100.0}, "sigma_min"),
        (INF | {"rho": -1}, "rho"),
        (INF | {"extra": 1}, "extra"),
        ({k: v for k, v in TRAIN.items() if k != "p_std"}, "p_std"),
        ({"kind": "uniform"}, "kind"),
        ({"kind": "mixture", "components": []}, "components"),
    ],
)
def test_bad_noise_params_name_the_field(raw, fragment):
    with pytest.raises(ValidationError, match=fragment):
        TypeAdapter(NoiseDistConfig).validate_python(raw)


def test_noise_config_is_frozen():
    cfg = TypeAdapter(NoiseDistConfig).validate_python(INF)
    with pytest.raises(ValidationError):
        cfg.rho = 3.0
