"""Presto-L: budget-conditioned layer dropping (Presto! sec. 3.3), with plain ASE as the baseline it improves on.

At high noise a denoiser needs less capacity (ASE, Moon et al. 2024), so a schedule over sigma gives the
number of DiT blocks that run, the *budget* b(sigma): all of them at low noise, fewer as sigma rises. The
DiT (presto/models/dit.py) runs a budget as a real subset of its blocks; the modes differ in how:

- `presto_l`: b is embedded into the adaLN conditioning (every block and the final layer), and the blocks
  are the first b-1 then always the last one (the reroute: the output layer keeps seeing the hidden-state
  statistics it was trained on). Loss, with x = x0 + sigma eps and lambda the EDM weight:

      L = lambda(sigma) |D_b(x; sigma) - x0|^2  +  nu lambda(sigma) |D_b(x; sigma) - sg(D_T(x; sigma))|^2

  D_b is the student at budget b = b(sigma), D_T the frozen full-depth teacher (sg: no gradient). The paper
  names the second term L_st with weight nu = 0.1; reading it as self-distillation toward the teacher is
  ours (nu = 0 turns it off).
- `ase`: no budget embedding, the first b blocks exit straight to the output layer, same DSM loss (nu is
  a param here too; 0 is plain ASE).
- `embed_only`, `reroute_only`: one of Presto-L's two changes each, to measure what each is worth on a teacher.

Schedule [ours, after ASE's DiT schedule]: budgets are given as counts out of a reference depth (ASE: 28
of 28, 24, 20, 16, 12 as noise rises) and scaled to the model's depth d as round_half_up(b d / ref),
clamped to [2, d] in every mode (with the reroute the last block always runs, so a budget of 1 would keep no
intermediate block at all; ASE gets the same floor so that the two run equal compute). Band i covers sigma
in (bounds[i-1], bounds[i]].
Which blocks a trained teacher can spare at which sigma is measured by bench/layer_sensitivity.py; the
params.yaml default follows it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from presto.config import BudgetScheduleConfig, LayerDropMode, LayerDropRecipe, NonNegFloat, Section
from presto.diffusion.edm import Denoiser, loss_weight, per_item_sigma
from presto.diffusion.noise import make_noise_dist
from presto.errors import InputError
from presto.models.dit import DiT, DiTConfig
from presto.models.ema import EMA
from presto.text.condition import TextCondition
from presto.training.dit_trainer import EMAStateMixin, autocast, keep_mask, step_generator, unwrap
from presto.training.progress import check_finite

# (budget conditioning, reroute) per mode
MODE_PARTS: dict[str, tuple[bool, bool]] = {"presto_l": (True, True), "ase": (False, False),
                                            "embed_only": (True, False), "reroute_only": (False, True)}
SCHEDULE_FORMAT = "presto-budget-schedule/1"
SCHEDULE_FILE = "schedule.json"  # beside a budgeted model's model/ folder: the schedule it was trained with


# ---- the budget schedule --------------------------------------------------------------------------------


def scale_budget(budget: int, reference_depth: int, depth: int, minimum: int) -> int:
    """round_half_up(budget * depth / reference_depth), clamped to [minimum, depth]; exact integer math."""
    scaled = (2 * budget * depth + reference_depth) // (2 * reference_depth)
    return min(depth, max(minimum, scaled))


class BudgetSchedule:
    """sigma [...] -> number of active blocks [...] (int64) for a DiT of `depth` blocks."""

    def __init__(self, cfg: BudgetScheduleConfig, depth: int, reroute: bool):
        if depth < (2 if reroute else 1):
            raise ValueError(f"a depth of {depth} leaves nothing to drop (the reroute needs at least 2 blocks)")
        # One floor in every mode, so that Presto-L and its ASE baseline run equally many blocks at every noise
        # level (a comparison at equal compute); with the reroute, 1 block would keep no intermediate block.
        minimum = min(2, depth)
        self.cfg, self.depth, self.reroute = cfg, depth, reroute
        self.budgets = [scale_budget(b, cfg.reference_depth, depth, minimum) for b in cfg.budgets]
        self._bounds = torch.tensor(cfg.sigma_bounds, dtype=torch.float64)
        self._table = torch.tensor(self.budgets, dtype=torch.long)

    def __call__(self, sigma: Tensor) -> Tensor:
        # bucketize (right=False) gives i with bounds[i-1] < sigma <= bounds[i]: bounds are inclusive tops.
        # Compared in sigma's precision, so a float32 sigma equal to float32(bound) lands in the lower band.
        values = sigma.detach().cpu()
        values = values if values.is_floating_point() else values.double()
        band = torch.bucketize(values, self._bounds.to(values.dtype))
        return self._table[band].to(sigma.device)

    def levels(self) -> list[tuple[float, int]]:
        """[(upper sigma of the band, budget)], lowest band first; the last band's top is inf."""
        return list(zip([*self.cfg.sigma_bounds, float("inf")], self.budgets))


def expected_compute(schedule: BudgetSchedule, sigmas: Tensor) -> float:
    """Block evaluations under the schedule / at full depth, over the noise levels a sampler evaluates.

    `sigmas` is a sampling grid; its zero (where no network runs) is dropped, every other level counts
    once (Euler, DPM-Solver++, consistency sampling). The ratio leaves out the input and output layers,
    which run at every budget.
    """
    evaluated = sigmas[sigmas > 0]
    if evaluated.numel() == 0:
        raise ValueError("expected_compute: the grid has no positive noise level")
    return float(schedule(evaluated).sum()) / (evaluated.numel() * schedule.depth)


def save_schedule(schedule: BudgetSchedule, path: str | Path) -> Path:
    """Write the schedule as JSON: its config (to rebuild it) and the resolved budgets (to read)."""
    path = Path(path)
    path.write_text(json.dumps({
        "format": SCHEDULE_FORMAT, "depth": schedule.depth, "reroute": schedule.reroute,
        "config": schedule.cfg.model_dump(mode="json"),
        "levels": [{"sigma_max": None if top == float("inf") else top, "budget": b} for top, b in schedule.levels()],
    }, indent=2) + "\n")
    return path


def load_schedule(path: str | Path) -> BudgetSchedule:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable budget schedule ({err})") from None
    if not isinstance(data, dict) or data.get("format") != SCHEDULE_FORMAT:
        raise InputError(f"{path}: not a budget schedule (format must be {SCHEDULE_FORMAT!r})")
    try:
        return BudgetSchedule(BudgetScheduleConfig(**data["config"]), int(data["depth"]), bool(data["reroute"]))
    except (KeyError, TypeError, ValueError, ValidationError) as err:
        raise InputError(f"{path}: invalid budget schedule ({err})") from None


class BudgetedDenoiser(Denoiser):
    """The EDM denoiser D(x, sigma, cond) of a budgeted DiT, running each item at the budget its sigma gets
    from the schedule. It is a Denoiser, so samplers, guidance wrappers, NFE counters and edm_loss take it
    unchanged; only the scheduled blocks execute."""

    def __init__(self, net: DiT, sigma_data: float, schedule: BudgetSchedule):
        if net.cfg.depth != schedule.depth:
            raise ValueError(f"the schedule is for depth {schedule.depth}, the DiT has {net.cfg.depth} blocks")
        super().__init__(net, sigma_data)
        self.schedule = schedule

    def forward(self, x: Tensor, sigma: float | Tensor, cond: Any, **net_kwargs: Any) -> Tensor:
        sigma = per_item_sigma(sigma, x)
        return super().forward(x, sigma, cond, budget=self.schedule(sigma), reroute=self.schedule.reroute,
                               **net_kwargs)


# ---- the loss -------------------------------------------------------------------------------------------


class PrestoLLoss(NamedTuple):
    """Per-item terms, each of shape (batch,): total = dsm + nu * self_distill."""

    total: Tensor
    dsm: Tensor
    self_distill: Tensor


def presto_l_loss(
    student: Denoiser, teacher: Denoiser | None, x0: Tensor, sigma: Tensor, cond: Any, noise: Tensor,
    budget: int | Tensor, nu: float, *, reroute: bool, teacher_cond: Any = None,
) -> PrestoLLoss:
    """EDM-weighted DSM of the student at `budget` + nu x EDM-weighted MSE to the full-depth teacher.

    Both terms use the same noisy input x0 + sigma noise. The teacher runs under no_grad (it is a fixed
    target) and only when nu > 0. `teacher_cond` is the teacher's view of cond where condition dropout
    swapped in each model's own null caption (default: cond).
    """
    if nu < 0:
        raise ValueError(f"nu = {nu}: the self-distillation weight must be >= 0")
    if nu > 0 and teacher is None:
        raise ValueError(f"nu = {nu} needs a teacher denoiser (pass nu = 0 to train on DSM alone)")
    sigma = per_item_sigma(sigma, x0)
    x0 = x0.to(torch.float32)
    noisy = x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * noise.to(torch.float32)
    weight = loss_weight(sigma, student.sigma_data)
    denoised = student(noisy, sigma, cond, budget=budget, reroute=reroute)
    dsm = weight * (denoised - x0).square().flatten(1).mean(dim=1)
    if nu == 0:
        self_distill = torch.zeros_like(dsm)
    else:
        with torch.no_grad():
            target = teacher(noisy, sigma, cond if teacher_cond is None else teacher_cond)
        self_distill = weight * (denoised - target).square().flatten(1).mean(dim=1)
    return PrestoLLoss(dsm + nu * self_distill, dsm, self_distill)


# ---- fine-tuning ----------------------------------------------------------------------------------------


class PrestoLConfig(Section):
    """A fine-tune: the mode (which of Presto-L's changes it makes), the self-distillation weight nu, the recipe."""

    mode: LayerDropMode
    nu_self_distill: NonNegFloat
    recipe: LayerDropRecipe

    @property
    def budget_conditioning(self) -> bool:
        return MODE_PARTS[self.mode][0]

    @property
    def reroute(self) -> bool:
        return MODE_PARTS[self.mode][1]


def student_from_teacher(teacher: DiT, budget_conditioning: bool) -> DiT:
    """A copy of the teacher, with a (zero-initialised, so function-preserving) budget embedding if asked."""
    cfg = DiTConfig(**(teacher.cfg.model_dump() | {"budget_conditioning": budget_conditioning}))
    reference = next(teacher.parameters())
    student = DiT(cfg).to(device=reference.device, dtype=reference.dtype)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"the teacher has weights the student would drop: {unexpected} "
                         "(a budget-conditioned teacher needs a budget-conditioned student)")
    if set(missing) - {"budget_embed.weight"}:
        raise ValueError(f"the student has weights the teacher lacks: {missing}")
    return student


class PrestoLTrainer(EMAStateMixin):
    """Fine-tunes a (possibly DDP-wrapped) student DiT toward the loss above; the teacher stays frozen.

    The Presto-L counterpart of presto.training.dit_trainer.DiTTrainer, with its conventions: randomness a
    pure function of (seed, rank, step), AdamW with global-norm clipping, an EMA of the weights, and the
    same resumable-state layout. Under DDP the student needs find_unused_parameters=True: a budget leaves
    blocks out of the graph. The teacher is frozen in place (requires_grad off, eval mode).
    """

    def __init__(self, net: nn.Module, cfg: PrestoLConfig, teacher: DiT | None, *, sigma_data: float,
                 device: torch.device, seed: int, rank: int = 0):
        self.dit = unwrap(net)
        if self.dit.cfg.budget_conditioning != cfg.budget_conditioning:
            raise ValueError(f"mode {cfg.mode!r} needs a student with budget_conditioning = "
                             f"{cfg.budget_conditioning} (build it with student_from_teacher)")
        if cfg.nu_self_distill > 0 and teacher is None:
            raise ValueError(f"nu_self_distill = {cfg.nu_self_distill} needs a teacher")
        self.cfg, self.device, self.seed, self.rank = cfg, device, seed, rank
        self.net = net
        self.student = Denoiser(net, sigma_data)
        self.teacher = Denoiser(teacher.requires_grad_(False).eval(), sigma_data) if teacher is not None else None
        self.schedule = BudgetSchedule(cfg.recipe.schedule, self.dit.cfg.depth, cfg.reroute)
        self.sigma_dist = make_noise_dist(cfg.recipe.sigma)
        self.optimizer = torch.optim.AdamW(self.dit.parameters(), lr=cfg.recipe.lr, betas=cfg.recipe.betas,
                                           weight_decay=cfg.recipe.weight_decay)
        self.ema = EMA(self.dit, cfg.recipe.ema_decay)
        self._ema_dit = copy.deepcopy(self.dit).requires_grad_(False).eval()

    def train_step(self, step: int, latents: Tensor, cond: TextCondition) -> dict[str, float]:
        """One optimiser step on clean latents [B, C, T]; returns loss, dsm, self_distill and grad_norm."""
        gen = step_generator(self.seed, self.rank, step)
        batch = latents.shape[0]
        sigma = self.sigma_dist.sample(batch, generator=gen).to(self.device)
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        keep = keep_mask(batch, self.cfg.recipe.cond_dropout, gen).to(self.device)

        self.net.train()
        cond = cond.to(self.device)
        # Each model reads its own null caption where the caption is dropped.
        teacher_cond = self.teacher.net.drop_cond(cond, keep) if self.teacher is not None else None
        with autocast(self.device):
            parts = presto_l_loss(self.student, self.teacher, latents.to(self.device, torch.float32), sigma,
                                  self.dit.drop_cond(cond, keep), noise, self.schedule(sigma),
                                  self.cfg.nu_self_distill, reroute=self.cfg.reroute, teacher_cond=teacher_cond)
        loss = parts.total.mean()
        check_finite(step, "presto_l: ", loss=float(loss.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.dit.parameters(), self.cfg.recipe.grad_clip)
        self.optimizer.step()
        self.ema.update(self.dit)
        return {"loss": float(loss.detach()), "dsm": float(parts.dsm.detach().mean()),
                "self_distill": float(parts.self_distill.detach().mean()), "grad_norm": float(grad_norm)}

