"""presto_s: distil train_dit's model into a few-step generator with Presto-S, on encode's latents.

The generator and the fake score start as copies of the teacher (train_dit's EMA weights), the teacher is
the frozen real score, and the discriminator head reads the fake score's middle block
(presto/distill/presto_s.py). Each iteration is a critic turn on a fresh batch, and every
`critic_updates_per_generator`-th also a generator turn; each loss term and its gradient norm are averaged
over `log_every` iterations and logged.

Every random draw of iteration i (the batch, the noise levels, the noise) is a function of (seed, i), so a
run resumed from a checkpoint continues exactly. `seed` (null: shared.seed) seeds the distillation alone: the
scoring noise stays shared.seed's, so a repeat at another seed says how much of a gap is the distillation's
luck. Every `ckpt_every` iterations the generator, fake score, head and both optimisers go to
ctx.checkpoint_dir; a rerun resumes from the newest state. A NaN or Inf loss or gradient stops the stage
before it reaches the weights (DivergenceError), and the runner keeps the checkpoints of a failed run, so the
last good state survives.

The exported generator is the EMA of G's weights (`method.generator_ema_decay`; presto/distill/presto_s.py says
why). The few-step generator is scored before and after training: the Frechet distance between Gaussians fitted
to the latent frames of validation clips and of clips it samples for their captions, at each of
`eval_steps` steps (a cheap proxy that lets the noise-distribution ablation be compared without the
evaluate stage; evaluate scores the audio).

Out: `model/` (the generator, a DiT), `edm.json` (the teacher's EDM constants), `presto_s.json` (the
sampling recipe: the consistency sampler, its steps and rho) and the metrics.

stages/presto_ls.py runs the same loop (`distil`) with another starting generator: the Presto-L network.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from presto.config import PrestoSParams
from presto.data.latents import LATENT_STATS, LatentDataset, LatentStats
from presto.diffusion.edm import Denoiser
from presto.diffusion.sampling import consistency_sigmas, sample_consistency
from presto.distill.presto_s import ROLES, PrestoS
from presto.errors import InputError
from presto.eval.metrics import frechet_distance
from presto.generation import EDM_FILE, MODEL_DIR, SamplingRecipe
from presto.models.checkpoint import save_model
from presto.models.disc_head import DiscHead
from presto.models.dit import DiT
from presto.text.condition import TextCondition
from presto.training.dit_trainer import autocast, batch_indices, step_generator
from presto.training.progress import Progress
from presto.training.state import latest_state
from stages.base import StageContext
from stages.presto_l import load_teacher
from stages.train_dit import _batch, _open_val, _validation_batches

RECIPE_FILE = "presto_s.json"
# Stream keys of step_generator(seed, stream, ...): the head's initial weights, the noise of training iterations,
# the noise of scoring.
HEAD_INIT, TRAIN_NOISE, EVAL_NOISE = 10, 11, 12


def seed_everything(*keys: int) -> None:
    """Seed torch's global generators (every device) from a tuple of integers."""
    torch.manual_seed(int(torch.randint(2**62, (), generator=step_generator(*keys))))


def latent_frechet(generator: Denoiser, batches: list[tuple[torch.Tensor, TextCondition]], recipe: SamplingRecipe,
                   steps: int, seed: int, device: torch.device) -> float:
    """Frechet distance between the latent frames [N * T, C] of the validation clips and of the generator's
    `steps`-step samples for their captions (the same noise every time it is called)."""
    seed_everything(seed, EVAL_NOISE, steps)
    sigmas = consistency_sigmas(steps, recipe.sigma_min, recipe.sigma_max, recipe.rho, device=device)
    real, fake = [], []
    with torch.no_grad(), autocast(device):
        for latents, cond in batches:
            x = sigmas[0] * torch.randn(latents.shape, device=device)
            fake.append(sample_consistency(generator, x, sigmas, cond=cond.to(device)).float().cpu())
            real.append(latents)
    frames = [torch.cat(z).transpose(1, 2).flatten(0, 1).double().numpy() for z in (real, fake)]
    return frechet_distance(*frames)


def score(generator: Denoiser, batches: list[tuple[torch.Tensor, TextCondition]], recipe: SamplingRecipe,
          eval_steps: list[int], seed: int, device: torch.device, prefix: str) -> dict[str, float]:
    return {f"{prefix}latent_fd_{n}step": latent_frechet(generator, batches, recipe, n, seed, device)
            for n in eval_steps}


def run(ctx: StageContext) -> dict[str, float]:
    p = ctx.params.presto_s
    device, teacher, edm = load_inputs(ctx, p)
    summary = distil(ctx, p, device, teacher, edm)
    (ctx.out_dir / RECIPE_FILE).write_text(p.recipe.model_dump_json(indent=2) + "\n")
    return summary


def load_inputs(ctx: StageContext, p: PrestoSParams) -> tuple[torch.device, DiT, dict[str, float]]:
    """The device p.resources asks for, and train_dit's model (the teacher) with its EDM constants."""
    if p.resources.gpus > 0 and not torch.cuda.is_available():
        raise InputError(f"{ctx.name}.resources.gpus = {p.resources.gpus} but CUDA is not available here")
    device = torch.device("cuda" if p.resources.gpus > 0 else "cpu")
    torch.set_num_threads(max(1, int(p.resources.cpus)))
    teacher_dir = ctx.upstream("train_dit")
    teacher, edm = load_teacher(teacher_dir, ctx.upstream("encode"), device)
    if teacher.cfg.depth < 2:
        raise InputError(f"{teacher_dir}: the teacher has {teacher.cfg.depth} block; Presto-S's discriminator "
                         "reads a middle block, so it needs at least 2")
    return device, teacher, edm


def distil(ctx: StageContext, p: PrestoSParams, device: torch.device, teacher: DiT, edm: dict[str, float],
           generator: Denoiser | None = None) -> dict[str, float]:
    """Presto-S for stage ctx.name with params p: trains, scores, and writes model/ (the generator's DiT) and
    edm.json; the caller writes the sampling recipe. The generator starts as a copy of the teacher unless
    `generator` is given (presto_ls: the Presto-L network running its layer budgets)."""
    encode_dir = ctx.upstream("encode")
    eval_seed = ctx.params.shared.seed  # the same scoring noise for every distillation seed, so scores compare
    seed = eval_seed if p.seed is None else p.seed
    stats = LatentStats.load(encode_dir / LATENT_STATS)
    seed_everything(seed, HEAD_INIT)
    head = DiscHead(p.head, in_width=teacher.cfg.width, frame_rate=stats.frames_per_second).to(device)
    method = PrestoS.from_teacher(Denoiser(teacher, edm["sigma_data"]), head, p.method, generator)
    k = p.method.critic_updates_per_generator
    ctx.tracker.set_tags({role: getattr(p.method, role) for role in ROLES}
                         | {"disc_strides": json.dumps(head.strides), "disc_logit_rate": f"{head.logit_rate:.3f}"})

    val = _validation_batches(_open_val(encode_dir), p.eval_clips, p.crop_frames, p.batch)
    start, summary = 0, {}
    state = latest_state(ctx.checkpoint_dir)
    if state is not None:
        summary = method.resume(state)["summary"]
        start = method.iteration
        print(f"{ctx.name}: resumes from iteration {start}", flush=True)
    elif val:  # the starting generator as a few-step generator: what distillation starts from
        summary |= score(method.generator, val, p.recipe, p.eval_steps, eval_seed, device, "init_")
    summary["resumed_from_iteration"] = float(start)

    train = LatentDataset(encode_dir, "train")
    progress = Progress(ctx.name, p.iterations, start=start, unit="iteration")
    window: list[dict[str, float]] = []
    for it in range(start, p.iterations):
        latents, cond = _batch(train, batch_indices(it, p.batch, len(train), seed, 0, 1), p.crop_frames, seed, 0, it)
        seed_everything(seed, TRAIN_NOISE, it)
        with autocast(device):
            window.append(method.train_step(latents.to(device), cond.to(device)))
        done = it + 1
        progress.update(done, dsm=window[-1]["loss/dsm"])
        if done % p.log_every == 0 or done == p.iterations:
            keys = {key for w in window for key in w}  # generator terms exist on generator iterations only
            means = {key: float(np.mean([w[key] for w in window if key in w])) for key in sorted(keys)}
            ctx.tracker.log_metrics(means, step=done)
            summary |= {"train_" + key.replace("/", "_"): v for key, v in means.items()}
            window = []
        if done % p.ckpt_every == 0 and done < p.iterations:
            method.save(ctx.checkpoint_dir, extra={"summary": summary})

    generator = method.ema_generator()
    if val:
        final = score(generator, val, p.recipe, p.eval_steps, eval_seed, device, "")
        ctx.tracker.log_metrics(final, step=p.iterations)
        summary |= final
    net = generator.net
    save_model(net, net.cfg, ctx.out_dir / MODEL_DIR)
    (ctx.out_dir / EDM_FILE).write_text(json.dumps(edm, indent=2) + "\n")
    return summary | {"iterations": float(p.iterations), "generator_updates": float(p.iterations // k)}
