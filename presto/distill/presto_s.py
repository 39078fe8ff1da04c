"""Presto-S: distribution matching step distillation of an EDM score model, with a GAN (Presto! sec. 3.2,
after DMD2, Yin et al. 2024). Our own code.

Roles, all EDM denoisers D(x; sigma, c) -> x0_hat:
  G        the generator (few-step student), starts as a copy of the teacher, trained;
  mu_fake  the fake score, starts as a copy of the teacher, trained to denoise G's samples;
  mu_real  the teacher itself, frozen, read with plain classifier-free guidance of scale w (4.5);
  D        the discriminator head, reads mu_fake's hidden states after its middle block, trained with it.
The exported generator is an EMA of G's weights, updated after every generator turn [ours]; decay 0 exports the
last weights, as the paper does. A short run's large lr might leave the last weights wherever the last few
adversarial updates threw them, but on the depth-12 science teacher decays 0.9-0.98 moved FAD by less than
the distillation seed does (bench/RESULTS.md).

Presto-LS (Presto! sec. 3.4) is this method with G started from the Presto-L network behind a
BudgetedDenoiser (presto/distill/presto_l.py): each of G's inputs runs the layer budget of its own sigma_g,
while mu_fake and mu_real stay full depth. Nothing below depends on how G computes its output.

One iteration on real latents x with condition c (sg = stop-gradient, eps fresh N(0, I) at every use):

    x_gen = G(x + sigma_g eps; sigma_g, c),  sigma_g ~ p_gen

  critic turn, every iteration, on sg(x_gen); updates mu_fake and D together:
    L_critic = lambda(sigma) ||mu_fake(x_gen + sigma eps; sigma) - x_gen||^2,  sigma ~ p_DSM    (EDM DSM)
             + nu_critic [ (D(h(x + s' eps)) - 1)^2 + D(h(x_gen + s'' eps))^2 ],  s', s'' ~ p_GAN  (LSGAN)

  generator turn, once per `critic_updates_per_generator` iterations; updates G only:
    x_s = x_gen + sigma eps,  sigma ~ p_DMD
    D_real = D_u + w (D_c - D_u)                                 (mu_real, conditional and null caption)
    g = (mu_fake(x_s) - D_real) / mean|x_gen - D_real|            (per sample, no gradient)
    L_gen = 0.5 mean (x_gen - sg(x_gen - g))^2 + nu_generator (D(h(x_gen + s'' eps)) - 1)^2

Why L_gen's first term: its gradient in x_gen is g / (number of elements), so G moves along
-g ~ D_real - D_fake. With scores s = (D - x) / sigma^2 that is the direction s_real - s_fake, i.e. a
descent step on KL(p_G || p_real) (DMD eq. 7); the per-sample normaliser replaces the 1/sigma^2 and keeps
the step size alike across noise levels and samples (DMD sec. 3.2). Adam divides out the overall scale
anyway, so what the normaliser changes is the relative weight of samples and noise levels in a batch.

The critic never backpropagates into G (it sees sg(x_gen)); the generator turn takes the gradient of its
GAN term with respect to x_gen only, so mu_fake and D get no gradient from it. Losses are means over
elements and batch (as DMD2), which keeps nu's meaning independent of the latent size.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from presto.config import ROLES, PrestoSConfig
from presto.diffusion.edm import Denoiser, c_in, c_noise, edm_loss, per_item_sigma
from presto.diffusion.noise import NoiseDist
from presto.diffusion.sampling import DenoiseFn
from presto.models.ema import EMA
from presto.training.progress import check_finite
from presto.training.state import load_state, save_state


# ---- the loss terms ------------------------------------------------------------------------------------


def _column(sigma: Tensor, ndim: int) -> Tensor:
    return sigma.reshape(-1, *([1] * (ndim - 1)))


def dmd_normaliser(x_gen: Tensor, d_real: Tensor) -> Tensor:
    """mean|x_gen - D_real| over every element of each sample, shape (batch, 1, ..., 1)."""
    return (x_gen - d_real).abs().flatten(1).mean(dim=1).reshape(-1, *([1] * (x_gen.ndim - 1)))


def dmd_gradient(x_gen: Tensor, d_fake: Tensor, d_real: Tensor) -> Tensor:
    """g = (D_fake - D_real) / mean|x_gen - D_real| per sample; the generator descends along g.

    D_fake and D_real are evaluated at the same re-noised x_gen. No gradient flows through g.
    """
    if not x_gen.shape == d_fake.shape == d_real.shape:
        raise ValueError(f"x_gen {list(x_gen.shape)}, d_fake {list(d_fake.shape)} and d_real "
                         f"{list(d_real.shape)} must have one shape")
    x_gen, d_fake, d_real = x_gen.detach().float(), d_fake.detach().float(), d_real.detach().float()
    return (d_fake - d_real) / dmd_normaliser(x_gen, d_real)


def dmd_loss(x_gen: Tensor, grad: Tensor) -> Tensor:
    """0.5 mean (x_gen - sg(x_gen - g))^2: a scalar whose gradient in x_gen is g / x_gen.numel()."""
    target = (x_gen - grad).detach()
    return 0.5 * ((x_gen.float() - target) ** 2).mean()


def fake_dsm_loss(fake_score: Denoiser, x_gen: Tensor, sigma: Tensor, cond: Any, noise: Tensor) -> Tensor:
    """EDM-weighted denoising loss of the fake score on stop-grad generator samples (mean over the batch)."""
    return edm_loss(fake_score, x_gen.detach(), sigma, cond, noise).mean()


def lsgan_critic_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Least-squares GAN, discriminator side: mean (D(real) - 1)^2 + mean D(fake)^2 (Mao et al. 2017)."""
    return ((logits_real.float() - 1) ** 2).mean() + (logits_fake.float() ** 2).mean()


def lsgan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Least-squares GAN, generator side: mean (D(fake) - 1)^2."""
    return ((logits_fake.float() - 1) ** 2).mean()


def guided_real_score(real_score: DenoiseFn, x: Tensor, sigma: Tensor, cond: Any, uncond: Any,
                      scale: float) -> Tensor:
    """D_real = D_u + w (D_c - D_u): the frozen teacher with plain CFG (CFG++ does not apply here).

    Two forwards, not ClassifierFreeGuidance's one on a doubled batch: its concat_cond cannot batch a
    TextCondition.
    """
    d_cond, d_uncond = real_score(x, sigma, cond), real_score(x, sigma, uncond)
    return d_uncond + scale * (d_cond - d_uncond)


def hidden_state(denoiser: Denoiser, x: Tensor, sigma: Tensor, cond: Any, block: int) -> Tensor:
    """The raw network's states after `block` at the point D(x; sigma, c) would evaluate, running only
    blocks 0..block.

    Goes to `denoiser.net` with the same EDM input scaling c_in x and c_noise that the Denoiser applies:
    the Denoiser's output c_skip x + c_out F has no room for states, and the second half of the network
    is not needed for them.
    """
    sigma = per_item_sigma(sigma, x)
    x_in = c_in(_column(sigma, x.ndim), denoiser.sigma_data) * x.float()
    _, hidden = denoiser.net(x_in, c_noise(sigma), cond, blocks=list(range(block + 1)), return_hidden={block})
    return hidden[block]


def accumulate_grads(terms: dict[str, Tensor], params: list[Tensor]) -> dict[str, float]:
    """Add d(term)/d(params) of every term into params' .grad; return each term's own gradient norm.

    The per-term norms show which loss drives the update (the GAN weights nu are tuned by them).
    """
    norms = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        norms[name] = _global_norm(g for g in grads if g is not None)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
    return norms


def _global_norm(tensors: Iterable[Tensor]) -> float:
    norms = [t.detach().float().norm() for t in tensors]
    return float(torch.stack(norms).norm()) if norms else 0.0


# ---- the method ----------------------------------------------------------------------------------------


class PrestoS:
    """The four roles, their two Adam optimisers and the update cadence.

    generator, fake_score: Denoisers (trained). real_score: any denoiser D(x, sigma, cond), frozen here.
    head: maps the fake score's hidden states after `feature_block` to per-frame logits.
    null_cond(cond) -> the unconditional input of the real score for a batch like `cond`.
    Randomness comes from torch's global generators, which `save` saves and `resume` restores.
    """

    def __init__(self, generator: Denoiser, fake_score: Denoiser, real_score: DenoiseFn, head: nn.Module,
                 cfg: PrestoSConfig, *, feature_block: int, null_cond: Callable[[Any], Any]):
        self.generator, self.fake_score, self.real_score, self.head = generator, fake_score, real_score, head
        self.cfg, self.feature_block, self.null_cond = cfg, feature_block, null_cond
        if isinstance(real_score, nn.Module):
            real_score.requires_grad_(False)
        self.p_gen, self.p_dmd, self.p_dsm, self.p_gan = (cfg.noise_dist(role) for role in ROLES)
        self.generator_params = [p for p in generator.parameters() if p.requires_grad]
        self.critic_params = [p for m in (fake_score, head) for p in m.parameters() if p.requires_grad]
        self.generator_opt = torch.optim.Adam(self.generator_params, lr=cfg.generator_lr, betas=cfg.betas)
        self.critic_opt = torch.optim.Adam(self.critic_params, lr=cfg.critic_lr, betas=cfg.betas)
        # Decay 0 exports G itself: no shadow and no copy, two generator-sized tensors fewer in memory and in
        # every checkpoint.
        self.generator_ema = EMA(generator, cfg.generator_ema_decay) if cfg.generator_ema_decay > 0 else None
        self._ema_generator = (copy.deepcopy(generator).requires_grad_(False).eval()
                               if self.generator_ema is not None else None)
        self.iteration = 0  # completed iterations (critic turns)

    @classmethod
    def from_teacher(cls, teacher: Denoiser, head: nn.Module, cfg: PrestoSConfig,
                     generator: Denoiser | None = None) -> "PrestoS":
        """Fake score as a copy of a DiT teacher, and the generator too unless `generator` is given (trained
        in place: Presto-LS passes the Presto-L network behind a BudgetedDenoiser); the teacher frozen as the
        real score; the head on the fake score's states after block depth // 2 - 1 (block 14 of 28, counted
        from 1)."""
        depth = teacher.net.cfg.depth
        if depth < 2:
            raise ValueError(f"the teacher has {depth} block(s); the discriminator needs a middle block")
        generator = copy.deepcopy(teacher) if generator is None else generator
        return cls(generator.requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True),
                   teacher.eval(), head, cfg, feature_block=depth // 2 - 1,
                   null_cond=lambda cond: teacher.net.null_cond(*cond.mask.shape))

    # -- state ------------------------------------------------------------------------------------------

    def ema_generator(self) -> Denoiser:
        """A copy of G holding its EMA weights (G itself at decay 0): the generator that is scored and exported."""
        if self.generator_ema is None:
            return self.generator
        self.generator_ema.copy_to(self._ema_generator)
        return self._ema_generator

    def modules(self) -> dict[str, nn.Module]:
        """What a resumable state holds besides the optimisers (the real score is the teacher's file)."""
        ema = {} if self.generator_ema is None else {"generator_ema": self.ema_generator()}
        return {"generator": self.generator, **ema, "fake_score": self.fake_score, "head": self.head}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.generator_opt, "critic": self.critic_opt}

    def save(self, folder: str | Path, extra: dict[str, Any]) -> Path:
        """The resumable state after `self.iteration` iterations, as `folder/step-<n>/`."""
        return save_state(folder, self.iteration, self.modules(), self.optimizers(), extra=extra)

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Restore a state written by `save` (weights, EMA, optimisers, iteration); returns its extra."""
        self.iteration, extra = load_state(path, self.modules(), self.optimizers())
        if self.generator_ema is not None:
            self.generator_ema.load_state_dict(self._ema_generator.state_dict())
        return extra

    # -- pieces -----------------------------------------------------------------------------------------

    @staticmethod
    def _noised(x: Tensor, dist: NoiseDist) -> tuple[Tensor, Tensor]:
        sigma = dist.sample(x.shape[0], device=x.device)
        return x + _column(sigma, x.ndim) * torch.randn_like(x), sigma

    def generate(self, x: Tensor, cond: Any) -> Tensor:
        """x_gen = G(x + sigma_g eps; sigma_g, c) with sigma_g ~ p_gen (grad into G unless disabled)."""
        noisy, sigma = self._noised(x.float(), self.p_gen)
        return self.generator(noisy, sigma, cond)

    def _logits(self, x: Tensor, cond: Any) -> Tensor:
        noisy, sigma = self._noised(x, self.p_gan)
        return self.head(hidden_state(self.fake_score, noisy, sigma, cond, self.feature_block))

    def _step(self, opt: torch.optim.Optimizer, params: list[Tensor], where: str,
              metrics: dict[str, float]) -> dict[str, float]:
        metrics[f"grad_norm/{where}"] = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        # Before the step: a non-finite loss or gradient must not reach the weights. Iterations count from 1
        # in messages, as in progress lines.
        check_finite(self.iteration + 1, f"Presto-S {where} turn, ", **metrics)
        opt.step()
        return metrics

    # -- the two turns ----------------------------------------------------------------------------------

    def critic_step(self, x: Tensor, cond: Any) -> dict[str, float]:
        """One update of fake score + head on a fresh stop-grad generator batch. G is not touched."""
        with torch.no_grad():
            x_gen = self.generate(x, cond)
        x = x.float()
        sigma = self.p_dsm.sample(x.shape[0], device=x.device)
        dsm = fake_dsm_loss(self.fake_score, x_gen, sigma, cond, torch.randn_like(x_gen))
        logits_real, logits_fake = self._logits(x, cond), self._logits(x_gen, cond)
        gan = lsgan_critic_loss(logits_real, logits_fake)
        self.critic_opt.zero_grad(set_to_none=True)
        norms = accumulate_grads({"dsm": dsm, "gan_critic": self.cfg.nu_critic * gan}, self.critic_params)
        metrics = {"loss/dsm": dsm.item(), "loss/gan_critic": gan.item(),
                   "grad_norm/dsm": norms["dsm"], "grad_norm/gan_critic": norms["gan_critic"],
                   "logit/real": logits_real.mean().item(), "logit/fake": logits_fake.mean().item()}
        return self._step(self.critic_opt, self.critic_params, "critic", metrics)

    def generator_step(self, x: Tensor, cond: Any) -> dict[str, float]:
        """One update of G by the DMD gradient + its LSGAN term. Fake score, head and real score are read only.

        Both terms are differentiated with respect to x_gen (that is where they meet; their norms there are
        logged) and the sum is backpropagated through G once.
        """
        x_gen = self.generate(x, cond)
        x_leaf = x_gen.detach().requires_grad_(True)
        with torch.no_grad():
            x_s, sigma = self._noised(x_leaf.detach(), self.p_dmd)
            d_fake = self.fake_score(x_s, sigma, cond)
            d_real = guided_real_score(self.real_score, x_s, sigma, cond, self.null_cond(cond),
                                       self.cfg.real_guidance)
        grad = dmd_gradient(x_leaf, d_fake, d_real)
        dmd = dmd_loss(x_leaf, grad)
        gan = lsgan_generator_loss(self._logits(x_leaf, cond))
        norms = accumulate_grads({"dmd": dmd, "gan_generator": self.cfg.nu_generator * gan}, [x_leaf])
        self.generator_opt.zero_grad(set_to_none=True)
        x_gen.backward(x_leaf.grad)
        metrics = {"loss/dmd": dmd.item(), "loss/gan_generator": gan.item(),
                   "grad_norm/dmd": norms["dmd"], "grad_norm/gan_generator": norms["gan_generator"],
                   "dmd/normaliser": float(dmd_normaliser(x_leaf.detach(), d_real).mean())}
        metrics = self._step(self.generator_opt, self.generator_params, "generator", metrics)
        if self.generator_ema is not None:
            self.generator_ema.update(self.generator)
        return metrics

    def train_step(self, x: Tensor, cond: Any) -> dict[str, float]:
        """One iteration: the critic turn, then the generator turn on every k-th iteration
        (k = critic_updates_per_generator), so that G always follows k fresh critic updates."""
        metrics = self.critic_step(x, cond)
        if (self.iteration + 1) % self.cfg.critic_updates_per_generator == 0:
            metrics |= self.generator_step(x, cond)
        self.iteration += 1
        return metrics
