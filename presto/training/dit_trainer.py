"""Training of the base EDM DiT: one optimiser step, its randomness, EMA, and a comparable validation loss.

One step (Karras et al. 2022; the method page, section 1):

    sigma ~ ln N(P_mean, P_std^2) truncated to [sigma_min, sigma_max]     (LogNormalSigma)
    keep  ~ Bernoulli(1 - cond_dropout) per item; dropped items get the DiT's learned null caption
    loss  = mean_items lambda(sigma) ||D(x0 + sigma eps; sigma, c) - x0||^2                  (edm_loss)
    AdamW step on the loss, gradients clipped to a global norm, then the EMA of the weights moves.

The condition dropout trains the unconditional model inside the conditional one, which classifier-free
guidance (and CFG++) needs at sampling time.

Randomness is a pure function of (seed, step): every draw of a step comes from its own generator, so a run
resumed from step n draws exactly what the uninterrupted run drew, and no RNG state has to be saved. Under
data parallelism each worker draws for the step's whole global batch and keeps its own items (item j of
worker r is item j * world + r, as `batch_indices` deals them), so `world` workers of batch B train as one
worker of batch world * B, up to float rounding, when every worker's batch has the same shape (clips at least
crop_frames long). Draws happen on the CPU and move to the device, so a seed means the same noise everywhere.

Mixed precision: on CUDA the network runs under bf16 autocast (the EDM preconditioning and the loss stay
float32 inside `Denoiser` / `edm_loss`); on CPU everything is float32.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from presto.config import TrainDiTParams
from presto.diffusion.edm import Denoiser, edm_loss
from presto.diffusion.noise import LogNormalSigma
from presto.models.dit import DiT
from presto.models.ema import EMA
from presto.text.condition import TextCondition
from presto.training.state import load_state, save_state


def step_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (seed, step, ...), well mixed by SeedSequence."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


# Second keys of step_generator that keep the noise of training steps and the draws for a batch's items
# (stages/train_dit.py) apart from each other and from the (seed, epoch) and (seed, batch, level) streams.
TRAIN_NOISE_STREAM, BATCH_ITEM_STREAM = 1001, 1002


def keep_mask(batch: int, drop_prob: float, generator: torch.Generator) -> Tensor:
    """bool [batch]: True where an item keeps its caption, each with probability 1 - drop_prob."""
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"condition dropout {drop_prob} must lie in [0, 1]")
    return torch.rand(batch, generator=generator) >= drop_prob


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU trains in float32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def warmup_lr(lr: float, warmup_steps: int, step: int) -> float:
    """Linear warm-up from lr / warmup_steps to lr over the first warmup_steps steps, then constant."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


def batch_indices(step: int, batch: int, items: int, seed: int, rank: int, world: int) -> list[int]:
    """Dataset indices of worker `rank`'s batch at `step`: data parallelism without a sampler's state.

    Each epoch e is one permutation of the items (seeded by (seed, e)), dealt round-robin to the `world`
    workers (a remainder of fewer than `world` items sits the epoch out, so every worker's epoch is equally
    long). Worker r reads its share of the epochs as one stream, `batch` items per step, so step s is
    positions [s batch, (s + 1) batch) of that stream: a resumed run reads what the uninterrupted run would.
    When `world` divides `items`, the workers' batches at step s together are, item j of worker r at place
    j * world + r, exactly one worker's batch of world * batch items at step s.
    """
    per_worker = items // world
    if per_worker == 0:
        raise ValueError(f"{items} training items cannot feed {world} workers")
    out, perms = [], {}
    for position in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(position, per_worker)
        if epoch not in perms:
            perms[epoch] = torch.randperm(items, generator=step_generator(seed, epoch))
        out.append(int(perms[epoch][k * world + rank]))
    return out


def random_crops(latents: Sequence[Tensor], frames: int, generators: Sequence[torch.Generator]) -> Tensor:
    """One random window per clip [C, T_i], all of length min(frames, shortest T_i): a batch [B, C, L].

    Clip i's start comes from generators[i] alone, so a clip's crop does not depend on its batch mates."""
    length = min(frames, *(z.shape[-1] for z in latents))
    starts = [int(torch.randint(z.shape[-1] - length + 1, (), generator=g)) for z, g in zip(latents, generators)]
    return torch.stack([z[..., s:s + length] for z, s in zip(latents, starts)])


def unwrap(net: nn.Module) -> DiT:
    """The DiT inside a DistributedDataParallel wrapper (or the DiT itself)."""
    inner = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
    if not isinstance(inner, DiT):
        raise TypeError(f"expected a DiT (possibly DDP-wrapped), got {type(inner).__name__}")
    return inner


class EMAStateMixin:
    """The EMA model and the resumable state of a trainer holding `dit`, its `ema`, an `_ema_dit` copy to
    read the EMA into, and one AdamW `optimizer` (DiTTrainer, presto.distill.presto_l.PrestoLTrainer)."""

    dit: DiT
    ema: EMA
    _ema_dit: DiT
    optimizer: torch.optim.Optimizer

    def ema_model(self) -> DiT:
        """A DiT holding the current EMA weights (the model that is validated and exported)."""
        self.ema.copy_to(self._ema_dit)
        return self._ema_dit

    def save(self, folder: str | Path, step: int, extra: dict[str, Any], keep: int = 1) -> Path:
        """Resumable state (weights, EMA weights, AdamW moments, step) as `folder/step-<n>/`."""
        return save_state(folder, step, {"model": self.dit, "ema": self.ema_model()},
                          {"adamw": self.optimizer}, extra=extra, keep=keep)

    def load(self, path: str | Path) -> tuple[int, dict[str, Any]]:
        """Restore a state written by `save`; returns (step, extra)."""
        step, extra = load_state(path, {"model": self.dit, "ema": self._ema_dit}, {"adamw": self.optimizer})
        self.ema.load_state_dict(self._ema_dit.state_dict())
        return step, extra


class DiTTrainer(EMAStateMixin):
    """Owns the optimiser and the EMA of one (possibly DDP-wrapped) DiT.

    `net` is what the forward runs through (the DDP wrapper under data parallelism, so gradients are
    averaged across workers); the EMA and the checkpoints use the DiT inside it, whose parameter names do
    not depend on the wrapper.
    """

    def __init__(self, net: nn.Module, params: TrainDiTParams, *, device: torch.device, seed: int,
                 rank: int = 0, world: int = 1):
        self.params, self.device, self.seed, self.rank, self.world = params, device, seed, rank, world
        self.net = net
        self.dit = unwrap(net)
        self.denoiser = Denoiser(net, params.sigma_data)
        self.sigma_dist = LogNormalSigma(params.p_mean, params.p_std, params.sigma_min, params.sigma_max)
        self.optimizer = torch.optim.AdamW(self.dit.parameters(), lr=params.lr, betas=tuple(params.betas),
                                           weight_decay=params.weight_decay)
        self.ema = EMA(self.dit, params.ema_decay)
        self._ema_dit = copy.deepcopy(self.dit).requires_grad_(False).eval()

    def train_step(self, step: int, latents: Tensor, cond: TextCondition) -> dict[str, float]:
        """One optimiser step on a batch of clean latents [B, C, T]; returns loss, grad_norm and lr."""
        p = self.params
        gen = step_generator(self.seed, TRAIN_NOISE_STREAM, step)
        total = latents.shape[0] * self.world  # the global batch; this worker's items are rank::world
        mine = slice(self.rank, None, self.world)
        sigma = self.sigma_dist.sample(total, generator=gen)[mine]
        noise = torch.randn((total, *latents.shape[1:]), generator=gen)[mine]
        keep = keep_mask(total, p.cond_dropout, gen)[mine]

        self.net.train()
        x0 = latents.to(self.device, torch.float32)
        cond = self.dit.drop_cond(cond.to(self.device), keep.to(self.device))
        lr = warmup_lr(p.lr, p.warmup_steps, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device):
            loss = edm_loss(self.denoiser, x0, sigma.to(self.device), cond, noise.to(self.device)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.dit.parameters(), p.grad_clip)
        self.optimizer.step()
        self.ema.update(self.dit)
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": lr}



@torch.no_grad()
def validation_loss(denoiser: Denoiser, batches: Iterable[tuple[Tensor, TextCondition]],
                    sigmas: Sequence[float], seed: int, device: torch.device) -> dict[str, float]:
    """The EDM loss at fixed noise levels with fixed noise: comparable between steps and between runs.

    For batch j and level k the noise comes from step_generator(seed, j, k), and no caption is dropped.
    Returns `val_loss` (the mean over levels of the per-item mean) and `val_loss_sigma_<sigma>` per level,
    so a curve shows where in sigma the model improves.
    """
    if not sigmas:
        raise ValueError("validation_loss needs at least one noise level")
    was_training = denoiser.training
    denoiser.eval()
    totals, count = [0.0] * len(sigmas), 0
    for j, (latents, cond) in enumerate(batches):
        x0 = latents.to(device, torch.float32)
        cond = cond.to(device)
        for k, sigma in enumerate(sigmas):
            noise = torch.randn(x0.shape, generator=step_generator(seed, j, k)).to(device)
            with autocast(device):
                totals[k] += float(edm_loss(denoiser, x0, torch.tensor(float(sigma)), cond, noise).sum())
        count += x0.shape[0]
    denoiser.train(was_training)
    if count == 0:
        raise ValueError("validation_loss got no validation items")
    per_level = {f"val_loss_sigma_{sigma:g}": total / count for sigma, total in zip(sigmas, totals)}
    out = {"val_loss": math.fsum(per_level.values()) / len(per_level)}
    return out | per_level
