"""Presto-S: the loss terms against hand computations, the discriminator head's geometry, the isolation of
the roles, the update cadence, resumption, divergence, and a toy distillation whose teacher is the exact
denoiser of a 2-D Gaussian mixture."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import presto.distill.presto_s as presto_s_module
from presto.diffusion.edm import Denoiser, c_skip, loss_weight
from presto.diffusion.noise import InferenceSigma, LogNormalSigma, MixtureSigma
from presto.diffusion.sampling import consistency_sigmas, sample_consistency
from presto.distill.presto_s import (
    PrestoS,
    PrestoSConfig,
    accumulate_grads,
    dmd_gradient,
    dmd_loss,
    dmd_normaliser,
    fake_dsm_loss,
    guided_real_score,
    hidden_state,
    lsgan_critic_loss,
    lsgan_generator_loss,
)
from presto.errors import DivergenceError
from presto.models.disc_head import DiscHead, DiscHeadConfig, downsample_strides
from presto.models.dit import DiT, DiTConfig
from presto.text.condition import TextCondition
from presto.training.state import latest_state

TRAIN = {"kind": "train", "p_mean": -0.4, "p_std": 1.0, "sigma_min": 0.002, "sigma_max": 80.0}
INF = {"kind": "inf", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


def make_cfg(**changes) -> PrestoSConfig:
    fields = dict(sigmas={"train": TRAIN, "inf": INF}, p_gen="inf", p_dmd="train", p_dsm="train", p_gan="train",
                  real_guidance=4.5,
                  critic_updates_per_generator=5, nu_critic=0.01, nu_generator=0.005,
                  generator_lr=3e-4, critic_lr=3e-4, betas=(0.0, 0.99), max_grad_norm=10.0,
                  generator_ema_decay=0.9)
    return PrestoSConfig(**(fields | changes))


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny networks: one thread is faster than two on a shared machine, and results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ---- the toy: a 2-D Gaussian mixture and its exact denoiser ------------------------------------------

SD = 0.5  # sigma_data: the mixture's std is ~0.6 per axis
MEANS = torch.tensor([[-0.6, -0.6], [0.6, -0.6], [-0.6, 0.6], [0.6, 0.6]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)  # unequal, so mode dropping shows
STD = 0.1


def mixture_sample(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points [n, 2, 1] (2 channels, 1 frame)."""
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    x = MEANS[k] + STD * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return x.float()[:, :, None]


def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: object) -> torch.Tensor:
    """E[x0 | x0 + sigma eps = x]: with x0 ~ sum_k w_k N(m_k, s^2 I), x is a mixture of N(m_k, (s^2 + sigma^2) I),
    and within component k the posterior mean is m_k + s^2 / (s^2 + sigma^2) (x - m_k); weight those by the
    components' posterior probabilities r_k(x)."""
    var = STD**2 + sigma.double()[:, None] ** 2  # [B, 1]
    xd = x[:, :, 0].double()
    log_r = WEIGHTS.log()[None] - ((xd[:, None, :] - MEANS[None]) ** 2).sum(-1) / (2 * var) - var.log()
    posterior = MEANS[None] + (STD**2 / var)[:, :, None] * (xd[:, None, :] - MEANS[None])
    return (log_r.softmax(dim=-1)[:, :, None] * posterior).sum(dim=1).float()[:, :, None]


class ToyNet(nn.Module):
    """A residual MLP with the DiT's calling convention: F(x_in, c_noise, cond, *, blocks, return_hidden),
    states of one "frame" [B, 1, width]. `cond` is ignored (the toy is unconditional)."""

    def __init__(self, width: int = 64, depth: int = 4):
        super().__init__()
        self.depth = depth
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), 16)))
        self.inp = nn.Linear(2, width)
        self.noise = nn.Linear(32, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(width, width)) for _ in range(depth))
        self.block_noise = nn.ModuleList(nn.Linear(32, width) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x_in, c_noise, cond, *, blocks=None, return_hidden=None):
        angles = c_noise[:, None] * self.freqs[None]
        emb = torch.cat([angles.cos(), angles.sin()], dim=-1)
        h = self.inp(x_in[:, :, 0]) + self.noise(emb)
        hidden = {}
        for i in blocks if blocks is not None else range(self.depth):
            h = h + self.blocks[i](h + self.block_noise[i](emb))
            if return_hidden is not None and i in return_hidden:
                hidden[i] = h[:, None, :]
        out = self.out(h)[:, :, None]
        return out if return_hidden is None else (out, hidden)


def toy_presto_s(start: Denoiser, cfg: PrestoSConfig, real=mixture_denoiser) -> PrestoS:
    """Generator and fake score as trainable copies of `start`; the head on its midpoint states (one frame
    at "1 Hz" with a 1 Hz target: every stride is 1)."""
    width = start.net.inp.out_features
    head = DiscHead(DiscHeadConfig(channels=width // 2, n_blocks=2, groups=4, target_rate=1.0), in_width=width,
                    frame_rate=1.0)
    return PrestoS(copy.deepcopy(start).requires_grad_(True), copy.deepcopy(start).requires_grad_(True), real,
                   head, cfg, feature_block=start.net.depth // 2 - 1, null_cond=lambda cond: cond)


@pytest.fixture(scope="module")
def toy_teacher() -> Denoiser:
    """'Initialised from the teacher' for an analytic teacher: an MLP regressed onto the exact denoiser,
    lambda(sigma) ||D_theta(x_sigma) - D*(x_sigma)||^2 over a wide log-normal in sigma."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = Denoiser(ToyNet(), SD)
    steps, lr = 500, 3e-3
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sigmas = LogNormalSigma(-0.4, 1.4, 0.002, 80.0)
    for i in range(steps):
        x0 = mixture_sample(256)
        sigma = sigmas.sample(256)
        x = x0 + sigma[:, None, None] * torch.randn_like(x0)
        err = (net(x, sigma, None) - mixture_denoiser(x, sigma, None)) ** 2
        loss = (loss_weight(sigma, SD) * err.sum(dim=(1, 2))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        opt.param_groups[0]["lr"] = lr * (1 - i / steps)
    torch.set_num_threads(threads)
    return net.requires_grad_(False)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (0 iff the distributions agree)."""
    a, b = a[:, :, 0].double(), b[:, :, 0].double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def mode_weight_error(x: torch.Tensor) -> float:
    """Total variation between the share of samples nearest each mode and the mixture weights."""
    nearest = torch.cdist(x[:, :, 0].double(), MEANS).argmin(dim=1)
    share = torch.bincount(nearest, minlength=len(WEIGHTS)).double() / len(nearest)
    return float(0.5 * (share - WEIGHTS).abs().sum())


def few_step_samples(generator: Denoiser, steps: int, n: int = 1000) -> torch.Tensor:
    torch.manual_seed(100 + steps)
    sigmas = consistency_sigmas(steps, 0.002, 80.0, 7.0)
    return sample_consistency(generator, sigmas[0] * torch.randn(n, 2, 1), sigmas, cond=torch.zeros(n, 1))


# ---- loss terms ---------------------------------------------------------------------------------------


def test_dmd_gradient_by_hand():
    x_gen = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])  # [2, 1, 2]
    d_real = torch.tensor([[[0.0, 0.0]], [[1.0, -3.0]]])
    d_fake = torch.tensor([[[2.0, 1.0]], [[3.0, -3.0]]])
    # normalisers: mean(|1|, |2|) = 1.5 and mean(|-1|, |3|) = 2
    torch.testing.assert_close(dmd_normaliser(x_gen, d_real), torch.tensor([[[1.5]], [[2.0]]]))
    expected = torch.tensor([[[2.0 / 1.5, 1.0 / 1.5]], [[2.0 / 2.0, 0.0]]])
    torch.testing.assert_close(dmd_gradient(x_gen, d_fake, d_real), expected)


def test_dmd_gradient_vanishes_when_fake_equals_real():
    x_gen, d = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.equal(dmd_gradient(x_gen, d, d), torch.zeros(3, 4, 5))


def test_dmd_normaliser_makes_each_sample_scale_free():
    """Scaling one sample's x_gen, D_fake and D_real by a leaves its g unchanged (no sample dominates by
    its magnitude); without the normaliser g would scale by a."""
    x_gen, d_fake, d_real = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    a = torch.tensor([1.0, 1e-3, 50.0])[:, None, None]
    torch.testing.assert_close(dmd_gradient(a * x_gen, a * d_fake, a * d_real), dmd_gradient(x_gen, d_fake, d_real))


def test_dmd_gradient_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        dmd_gradient(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))


def test_dmd_loss_gradient_is_g_and_descends_toward_the_real_score():
    x_gen = torch.randn(2, 3, 4, requires_grad=True)
    d_real = torch.randn(2, 3, 4)
    g = dmd_gradient(x_gen, x_gen.detach(), d_real)  # the fake score sees samples exactly where they are
    loss = dmd_loss(x_gen, g)
    torch.testing.assert_close(loss, 0.5 * (g**2).mean())
    loss.backward()
    torch.testing.assert_close(x_gen.grad, g / x_gen.numel())
    stepped = x_gen.detach() - 0.1 * x_gen.numel() * x_gen.grad  # a small step against the gradient
    assert (stepped - d_real).norm() < (x_gen.detach() - d_real).norm()


def test_lsgan_losses_by_hand():
    assert lsgan_critic_loss(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0
    assert lsgan_critic_loss(torch.full((1, 2), 0.5), torch.full((1, 2), 0.5)).item() == pytest.approx(0.5)
    assert lsgan_critic_loss(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, -1.0]])).item() == pytest.approx(2.0)
    assert lsgan_generator_loss(torch.ones(4, 2)).item() == 0.0
    assert lsgan_generator_loss(torch.tensor([[0.0, 2.0]])).item() == pytest.approx(1.0)


class Zero(nn.Module):
    def forward(self, x_in, c_noise, cond, **kw):
        return torch.zeros_like(x_in)


def test_fake_dsm_loss_is_edm_weighted_and_stops_the_generator_gradient():
    fake = Denoiser(Zero(), SD)  # D(x) = c_skip x
    x_gen = torch.randn(3, 2, 5, requires_grad=True)
    sigma, noise = torch.tensor([0.1, 1.0, 10.0]), torch.randn(3, 2, 5)
    s = sigma[:, None, None]
    x0 = x_gen.detach()
    by_hand = loss_weight(sigma, SD) * ((c_skip(s, SD) * (x0 + s * noise) - x0) ** 2).mean(dim=(1, 2))
    loss = fake_dsm_loss(fake, x_gen, sigma, None, noise)
    torch.testing.assert_close(loss, by_hand.mean())
    assert not loss.requires_grad  # no path back to x_gen (Zero has no parameters)


def test_guided_real_score_is_plain_cfg():
    def real(x, sigma, cond):  # D_c = 2x, D_u = x / 2
        return x * cond[:, :, None]

    x, sigma = torch.randn(3, 2, 4), torch.ones(3)
    d = guided_real_score(real, x, sigma, torch.full((3, 1), 2.0), torch.full((3, 1), 0.5), 4.5)
    torch.testing.assert_close(d, 0.5 * x + 4.5 * (2.0 * x - 0.5 * x))


def test_accumulate_grads_sums_terms_and_reports_each_norm():
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    norms = accumulate_grads({"square": (p**2).sum(), "linear": 3 * p.sum()}, [p])
    assert norms["square"] == pytest.approx(math.hypot(2.0, 4.0))
    assert norms["linear"] == pytest.approx(math.hypot(3.0, 3.0))
    torch.testing.assert_close(p.grad, torch.tensor([5.0, 7.0]))


# ---- discriminator head -------------------------------------------------------------------------------


def test_downsample_strides_reach_about_2_8_hz():
    assert downsample_strides(21.5, 2.8, 4) == [2, 2, 2, 1]  # paper latents: 8x, 2.69 Hz
    assert downsample_strides(16000 / 256, 2.8, 4) == [3, 2, 2, 2]  # demo latents, 62.5 Hz: 24x, 2.60 Hz
    assert downsample_strides(16000 / 1024, 2.8, 4) == [3, 2, 1, 1]  # 15.6 Hz: 6x, 2.60 Hz
    assert downsample_strides(2.0, 2.8, 4) == [1, 1, 1, 1]  # already below the target
    assert downsample_strides(48.0, 3.0, 2) == [4, 4]
    with pytest.raises(ValueError, match="use more blocks"):
        downsample_strides(100.0, 2.8, 2)
    with pytest.raises(ValueError, match="rates must be > 0"):
        downsample_strides(0.0, 2.8, 4)


def test_disc_head_gives_one_logit_per_downsampled_frame():
    head = DiscHead(DiscHeadConfig(channels=16, n_blocks=4, groups=4, target_rate=2.8), in_width=32, frame_rate=21.5)
    assert head.logit_rate == pytest.approx(21.5 / 8)
    assert len(head.blocks) == 4
    assert head(torch.randn(2, 43, 32)).shape == (2, 6)  # 2 s of latents -> ceil(43 / 8) logits
    with pytest.raises(ValueError, match=r"hidden states \[B, T, 32\]"):
        head(torch.randn(2, 43, 31))
    with pytest.raises(ValidationError, match="multiple of groups"):
        DiscHeadConfig(channels=10, n_blocks=4, groups=4, target_rate=2.8)


# ---- config -------------------------------------------------------------------------------------------


def test_config_chooses_each_noise_distribution_by_name_and_validates():
    mixture = {"kind": "mixture", "components": [{"weight": 1, "dist": TRAIN}, {"weight": 1, "dist": INF}]}
    cfg = make_cfg(sigmas={"train": TRAIN, "inf": INF, "mixed": mixture}, p_dsm="mixed")
    kinds = [cfg.sigmas[getattr(cfg, role)].kind for role in ("p_gen", "p_dmd", "p_dsm", "p_gan")]
    assert kinds == ["inf", "train", "mixture", "train"]
    m = toy_presto_s(Denoiser(ToyNet(width=16, depth=2), SD), cfg)
    assert isinstance(m.p_gen, InferenceSigma) and isinstance(m.p_dmd, LogNormalSigma)
    assert isinstance(m.p_dsm, MixtureSigma) and isinstance(m.p_gan, LogNormalSigma)
    with pytest.raises(ValidationError, match=r"p_dmd = 'uniform' is not one of sigmas \['inf', 'train'\]"):
        make_cfg(p_dmd="uniform")
    with pytest.raises(ValidationError, match="critic_updates_per_generator"):
        make_cfg(critic_updates_per_generator=0)
    with pytest.raises(ValidationError, match="betas"):
        make_cfg(betas=(0.9, 1.0))
    with pytest.raises(ValidationError, match="sigmas"):
        make_cfg(sigmas={"train": {"kind": "uniform"}})


# ---- the roles ----------------------------------------------------------------------------------------


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def assert_changed(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_critic_step_updates_fake_score_and_head_only():
    m = toy_presto_s(Denoiser(ToyNet(), SD), make_cfg())
    g0, f0, h0 = snapshot(m.generator), snapshot(m.fake_score), snapshot(m.head)
    metrics = m.critic_step(mixture_sample(16), torch.zeros(16, 1))
    assert_same(m.generator, g0)
    assert all(p.grad is None for p in m.generator.parameters())  # not even a gradient reached G
    assert_changed(m.fake_score, f0)
    assert_changed(m.head, h0)
    assert {"loss/dsm", "loss/gan_critic", "grad_norm/dsm", "grad_norm/gan_critic", "grad_norm/critic"} <= set(metrics)


def test_generator_step_updates_generator_only():
    m = toy_presto_s(Denoiser(ToyNet(), SD), make_cfg())
    g0, f0, h0 = snapshot(m.generator), snapshot(m.fake_score), snapshot(m.head)
    metrics = m.generator_step(mixture_sample(16), torch.zeros(16, 1))
    assert_changed(m.generator, g0)
    assert_same(m.fake_score, f0)
    assert_same(m.head, h0)
    assert all(p.grad is None for p in [*m.fake_score.parameters(), *m.head.parameters()])
    assert {"loss/dmd", "loss/gan_generator", "grad_norm/dmd", "grad_norm/gan_generator",
            "grad_norm/generator", "dmd/normaliser"} <= set(metrics)


@pytest.mark.parametrize("k", [1, 5])
def test_cadence_is_k_critic_updates_per_generator_update(k):
    m = toy_presto_s(Denoiser(ToyNet(width=16, depth=2), SD), make_cfg(critic_updates_per_generator=k))
    turns = []
    for i in range(10):
        metrics = m.train_step(mixture_sample(8), torch.zeros(8, 1))
        turns.append("loss/dmd" in metrics)
    assert m.iteration == 10
    assert turns == [(i + 1) % k == 0 for i in range(10)]

    def adam_steps(opt):
        return {int(s["step"]) for s in opt.state.values()}

    assert adam_steps(m.critic_opt) == {10}
    assert adam_steps(m.generator_opt) == {10 // k}


def test_non_finite_loss_stops_before_the_weights_change():
    def broken_real(x, sigma, cond):
        return torch.full_like(x, float("nan"))

    m = toy_presto_s(Denoiser(ToyNet(), SD), make_cfg(), real=broken_real)
    g0 = snapshot(m.generator)
    with pytest.raises(DivergenceError, match=r"Presto-S generator turn, step 1: loss/dmd = nan"):
        m.generator_step(mixture_sample(8), torch.zeros(8, 1))
    assert_same(m.generator, g0)


def test_resumed_training_continues_exactly(tmp_path):
    start = Denoiser(ToyNet(width=16, depth=2), SD)
    cfg = make_cfg(critic_updates_per_generator=2)

    def run(m: PrestoS, iterations: range) -> None:
        for i in iterations:
            m.train_step(mixture_sample(8, torch.Generator().manual_seed(i)), torch.zeros(8, 1))

    torch.manual_seed(1)
    straight = toy_presto_s(start, cfg)
    run(straight, range(6))

    torch.manual_seed(1)
    first = toy_presto_s(start, cfg)
    run(first, range(3))
    first.save(tmp_path, extra={"note": "first"})
    torch.manual_seed(999)  # whatever ran in between must not matter
    resumed = toy_presto_s(start, cfg)
    assert resumed.resume(latest_state(tmp_path)) == {"note": "first"} and resumed.iteration == 3
    run(resumed, range(3, 6))

    for name, module in straight.modules().items():  # the generator's EMA too
        assert_same(resumed.modules()[name], snapshot(module))


def test_the_exported_generator_is_the_ema_of_its_weights_over_generator_turns():
    start = Denoiser(ToyNet(width=16, depth=2), SD)
    for decay in (0.8, 0.0):
        m = toy_presto_s(start, make_cfg(critic_updates_per_generator=2, generator_ema_decay=decay))
        expected = snapshot(m.generator)  # the EMA starts at the starting weights
        for i in range(6):
            m.train_step(mixture_sample(8, torch.Generator().manual_seed(i)), torch.zeros(8, 1))
            if (i + 1) % 2 == 0:  # a generator turn: shadow <- decay shadow + (1 - decay) weights
                expected = {k: decay * expected[k] + (1 - decay) * v for k, v in snapshot(m.generator).items()}
        ema = m.ema_generator().state_dict()
        for k, v in expected.items():
            torch.testing.assert_close(ema[k], v, rtol=1e-6, atol=1e-7, msg=k)
        if decay == 0.0:  # 0: the generator itself, with no shadow or copy to hold or checkpoint
            assert_same(m.ema_generator(), snapshot(m.generator))
            assert m.ema_generator() is m.generator and "generator_ema" not in m.modules()
        else:
            assert_changed(m.ema_generator(), snapshot(m.generator))


# ---- with the DiT ---------------------------------------------------------------------------------------


def tiny_dit_teacher() -> Denoiser:
    cfg = DiTConfig(latent_channels=4, width=32, depth=4, heads=2, mlp_ratio=2.0, text_dim=12,
                    budget_conditioning=False)
    dit = DiT(cfg)
    with torch.no_grad():  # move off adaLN-Zero's zeros, so that the blocks and the output do something
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return Denoiser(dit, SD)


def text_cond(batch: int) -> TextCondition:
    return TextCondition(torch.randn(batch, 5, 12), torch.ones(batch, 5, dtype=torch.bool), torch.randn(batch, 12))


def test_hidden_state_is_the_dit_midpoint_and_runs_only_the_first_half():
    teacher = tiny_dit_teacher()
    x, sigma, cond = torch.randn(2, 4, 16), torch.tensor([0.3, 5.0]), text_cond(2)
    ran = []
    hooks = [b.register_forward_pre_hook(lambda _m, _a, i=i: ran.append(i)) for i, b in enumerate(teacher.net.blocks)]
    h = hidden_state(teacher, x, sigma, cond, block=1)
    assert ran == [0, 1]
    for hook in hooks:
        hook.remove()
    s = sigma[:, None, None]
    _, full = teacher.net(x / (s**2 + SD**2).sqrt(), sigma.log() / 4, cond, return_hidden={1})
    torch.testing.assert_close(h, full[1])
    assert h.shape == (2, 16, 32)


def test_from_teacher_copies_the_teacher_and_freezes_the_real_score():
    teacher = tiny_dit_teacher()
    before = snapshot(teacher)
    head = DiscHead(DiscHeadConfig(channels=8, n_blocks=4, groups=2, target_rate=2.8), in_width=32, frame_rate=21.5)
    m = PrestoS.from_teacher(teacher, head, make_cfg(critic_updates_per_generator=1))
    assert m.feature_block == 1  # depth 4 -> after the second block (28 -> block 14, counted from 1)
    assert m.generator is not teacher and m.fake_score is not teacher and m.generator is not m.fake_score
    assert_same(m.generator, before)
    assert_same(m.fake_score, before)
    assert not any(p.requires_grad for p in teacher.parameters())
    metrics = m.train_step(torch.randn(2, 4, 16), text_cond(2))  # critic and generator turn, CFG on null_cond
    assert "loss/dmd" in metrics and all(math.isfinite(v) for v in metrics.values())
    assert_same(teacher, before)
    assert_changed(m.generator, before)


# ---- the toy distillation -------------------------------------------------------------------------------


def flipped_dmd_gradient(x_gen, d_fake, d_real):
    return -(d_fake - d_real) / dmd_normaliser(x_gen, d_real)


@pytest.mark.parametrize("variant", ["paper", "flipped_sign"])
def test_toy_distillation_matches_the_mixture_in_1_2_4_steps(toy_teacher, variant, monkeypatch):
    """G and the fake score start as the teacher's regression; the real score is the exact mixture
    denoiser (w = 1: unconditional). After 400 iterations the 1-, 2- and 4-step samples match the mixture
    (energy distance and mode weights far better than at the start); with the DMD sign flipped G runs away."""
    if variant == "flipped_sign":
        monkeypatch.setattr(presto_s_module, "dmd_gradient", flipped_dmd_gradient)
    reference = mixture_sample(1000, torch.Generator().manual_seed(7))
    before = {n: energy_distance(few_step_samples(toy_teacher, n), reference) for n in (1, 2, 4)}
    torch.manual_seed(0)
    m = toy_presto_s(toy_teacher, make_cfg(real_guidance=1.0))
    try:
        for _ in range(400):
            m.train_step(mixture_sample(128), torch.zeros(128, 1))
    except DivergenceError:
        assert variant == "flipped_sign"
        return
    samples = {n: few_step_samples(m.generator, n) for n in (1, 2, 4)}
    after = {n: energy_distance(samples[n], reference) for n in (1, 2, 4)}
    print(variant, "energy distance before", before, "after", after,
          "mode weight error", {n: mode_weight_error(s) for n, s in samples.items()})
    if variant == "paper":
        assert before[1] > 0.3  # the teacher as a one-step generator: the blurred mixture mean
        for n in (1, 2, 4):
            assert after[n] < 0.5 * before[n] and after[n] < 0.08, (n, before[n], after[n])
            assert mode_weight_error(samples[n]) < 0.15, n
    else:
        assert after[1] > 2 * before[1]
