"""presto_l and ase: fine-tune the base DiT into a layer-dropping model on encode's latents.

One module, two stages (stages/specs.py):
- presto_l: Presto-L (params `presto_l`: mode presto_l is the budget embedding, the reroute to the last
  block and self-distillation toward the teacher with weight nu_self_distill);
- ase: the plain-ASE baseline (mode ase, its own `ase.nu_self_distill`, 0 for ASE as published).
`presto_l.mode` embed_only or reroute_only makes the presto_l stage an ablation with one of the two changes.
Both train with the recipe, data and steps of params `layer_dropping`, so the two models differ only in
what Presto-L changes and evaluate measures the improvement instead of assuming it.

The student starts as the teacher (train_dit's EMA model) plus, for presto_l, a zero-initialised budget
embedding, so step 0 is the teacher run at the scheduled budgets. The validation loss of the EMA weights at
their scheduled budgets is logged beside the full-depth teacher's at the same noise levels and noise.
`layer_dropping.seed` (null: shared.seed) seeds the fine-tune alone: the validation noise stays shared.seed's,
so a repeat of both fine-tunes at another seed says how much of a gap between them is the training's own luck.

Resumption: every `ckpt_every` steps a training state goes to ctx.checkpoint_dir (keyed by the stage's
input fingerprint); a rerun after a crash resumes from the newest one, and since every random draw is a
function of (seed, step), it continues exactly. Out: `model/` (the EMA DiT), `edm.json` (the teacher's
EDM constants), `schedule.json` (the budget schedule at the model's depth) and the metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from presto.data.latents import LatentDataset, check_latents_fit
from presto.diffusion.edm import Denoiser
from presto.distill.presto_l import (
    SCHEDULE_FILE,
    BudgetedDenoiser,
    PrestoLConfig,
    PrestoLTrainer,
    save_schedule,
    student_from_teacher,
)
from presto.errors import InputError
from presto.generation import EDM_FILE, MODEL_DIR, read_edm
from presto.models.checkpoint import load_model, save_model
from presto.models.dit import DiT
from presto.training.dit_trainer import batch_indices, validation_loss
from presto.training.progress import Progress
from presto.training.state import latest_state
from stages.base import StageContext
from stages.train_dit import _batch, _open_val, _validation_batches



def fine_tune_config(ctx: StageContext) -> PrestoLConfig:
    """The shared recipe with the stage's own mode and self-distillation weight."""
    recipe = ctx.params.layer_dropping.recipe
    if ctx.name == "presto_l":
        own = ctx.params.presto_l
        return PrestoLConfig(mode=own.mode, nu_self_distill=own.nu_self_distill, recipe=recipe)
    if ctx.name == "ase":
        return PrestoLConfig(mode="ase", nu_self_distill=ctx.params.ase.nu_self_distill, recipe=recipe)
    raise ValueError(f"stages/presto_l.py runs the presto_l and ase stages, not {ctx.name!r}")


def load_teacher(folder: Path, encode_dir: Path, device: torch.device) -> tuple[DiT, dict[str, float]]:
    """train_dit's model and EDM constants, checked against encode's latents and captions."""
    edm = read_edm(folder / EDM_FILE)
    teacher, _ = load_model(folder / MODEL_DIR, device=device)
    if not isinstance(teacher, DiT):
        raise InputError(f"{folder / MODEL_DIR}: holds a {type(teacher).__name__}, not a DiT")
    check_latents_fit(encode_dir, sigma_data=edm["sigma_data"], latent_channels=teacher.cfg.latent_channels,
                      text_dim=teacher.cfg.text_dim, model=f"the teacher in {folder}", fix="rerun train_dit")
    return teacher, edm


def run(ctx: StageContext) -> dict[str, float]:
    p = ctx.params.layer_dropping
    cfg = fine_tune_config(ctx)
    val_seed = ctx.params.shared.seed  # the same validation noise for every fine-tune seed, so losses compare
    train_seed = val_seed if p.seed is None else p.seed
    if p.resources.gpus > 0 and not torch.cuda.is_available():
        raise InputError(f"layer_dropping.resources.gpus = {p.resources.gpus} but CUDA is not available here")
    device = torch.device("cuda" if p.resources.gpus > 0 else "cpu")
    torch.set_num_threads(max(1, int(p.resources.cpus)))

    encode_dir = ctx.upstream("encode")
    teacher, edm = load_teacher(ctx.upstream("train_dit"), encode_dir, device)
    sigma_data = edm["sigma_data"]
    student = student_from_teacher(teacher, cfg.budget_conditioning)
    trainer = PrestoLTrainer(student, cfg, teacher if cfg.nu_self_distill > 0 else None, sigma_data=sigma_data,
                             device=device, seed=train_seed)
    ctx.tracker.set_tags({"mode": cfg.mode, "budgets": json.dumps(trainer.schedule.budgets)})

    start, summary = 0, {}
    state = latest_state(ctx.checkpoint_dir)
    if state is not None:
        start, extra = trainer.load(state)
        summary = extra["summary"]
        print(f"{ctx.name}: resumes from step {start}", flush=True)
    summary["resumed_from_step"] = float(start)

    train = LatentDataset(encode_dir, "train")
    val = _validation_batches(_open_val(encode_dir), p.val_clips, p.crop_frames, p.batch)
    if val:
        teacher_scores = validation_loss(Denoiser(teacher, sigma_data), val, p.val_sigmas, val_seed, device)
        summary |= {f"teacher_{k}": v for k, v in teacher_scores.items()}

    progress = Progress(ctx.name, p.steps, start=start)
    window: list[dict[str, float]] = []
    for step in range(start, p.steps):
        latents, cond = _batch(train, batch_indices(step, p.batch, len(train), train_seed, 0, 1), p.crop_frames,
                               train_seed, 0, step)
        window.append(trainer.train_step(step, latents, cond))
        done = step + 1
        progress.update(done, loss=window[-1]["loss"])
        if done % p.log_every == 0 or done == p.steps:
            means = {f"train_{k}": float(np.mean([w[k] for w in window])) for k in window[0]}
            ctx.tracker.log_metrics(means, step=done)
            summary |= means
            window = []
        if val and (done % p.val_every == 0 or done == p.steps):
            budgeted = BudgetedDenoiser(trainer.ema_model(), sigma_data, trainer.schedule)
            scores = validation_loss(budgeted, val, p.val_sigmas, val_seed, device)
            ctx.tracker.log_metrics(scores, step=done)
            summary |= scores
        if done % p.ckpt_every == 0 and done < p.steps:
            trainer.save(ctx.checkpoint_dir, done, {"summary": summary})

    model = trainer.ema_model()
    save_model(model, model.cfg, ctx.out_dir / MODEL_DIR)
    (ctx.out_dir / EDM_FILE).write_text(json.dumps(edm, indent=2) + "\n")
    save_schedule(trainer.schedule, ctx.out_dir / SCHEDULE_FILE)
    return summary | {"steps": float(p.steps), "min_budget": float(min(trainer.schedule.budgets))}
