"""presto_ls: Presto-LS, step distillation of the Presto-L network (Presto! sec. 3.4), on encode's latents.

Presto-S (stages/presto_s.py: the same loop, the same params schema) with one change: the generator starts
as presto_l's model and runs the layer budgets of `presto_ls.schedule`, milder than presto_l's (the paper's
Presto-LS drops fewer layers), behind a BudgetedDenoiser, so each of its inputs runs the blocks of its own
noise level. The real score (train_dit's model, frozen) and the fake score (a copy of it) run every block:
the paper's "full-rank auxiliary models". Resumption, divergence and scoring are presto_s's.

Out: `model/` (the generator, a budget-conditioned DiT), `edm.json`, `schedule.json` (the generator's
schedule at its depth: evaluate and serving run each noise level at its budget, at any step count and rho),
`presto_ls.json` (the sampling recipe, with the schedule's budget at each of its steps, so that
`Generator.generate` with it skips the blocks the generator was trained without) and the metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from presto.distill.presto_l import (
    SCHEDULE_FILE,
    BudgetedDenoiser,
    BudgetSchedule,
    expected_compute,
    load_schedule,
    save_schedule,
)
from presto.errors import InputError
from presto.generation import EDM_FILE, MODEL_DIR, SamplingRecipe, read_edm
from presto.models.checkpoint import load_model
from presto.models.dit import DiT
from stages.base import StageContext
from stages.presto_s import distil, load_inputs

RECIPE_FILE = "presto_ls.json"


def load_presto_l(folder: Path, teacher: DiT, edm: dict[str, float], device: torch.device) -> DiT:
    """presto_l's model, checked to be the teacher's network fine-tuned in Presto-L's mode."""
    net, _ = load_model(folder / MODEL_DIR, device=device)
    if not isinstance(net, DiT):
        raise InputError(f"{folder / MODEL_DIR}: holds a {type(net).__name__}, not a DiT")
    # The budgets of a sampling recipe reach the DiT with the reroute, and embedded: Presto-L's mode.
    if not (net.cfg.budget_conditioning and load_schedule(folder / SCHEDULE_FILE).reroute):
        raise InputError(f"{folder}: holds an ablation (presto_l.mode other than presto_l); Presto-LS distils the "
                         "Presto-L network (budget conditioning and the reroute): set presto_l.mode to presto_l")
    if net.cfg.model_dump() != teacher.cfg.model_dump() | {"budget_conditioning": True}:
        raise InputError(f"{folder}: its DiT ({net.cfg}) is not the teacher's ({teacher.cfg}) with budget "
                         "conditioning; rerun presto_l")
    if read_edm(folder / EDM_FILE)["sigma_data"] != edm["sigma_data"]:
        raise InputError(f"{folder / EDM_FILE}: sigma_data differs from the teacher's {edm['sigma_data']}; "
                         "rerun presto_l")
    return net


def with_budgets(recipe: SamplingRecipe, schedule: BudgetSchedule) -> SamplingRecipe:
    """The recipe with the schedule's budget at each of its steps' noise levels."""
    sigmas = recipe.sigmas()[:recipe.steps]
    return SamplingRecipe.model_validate(recipe.model_dump() | {"budgets": schedule(sigmas).tolist()})


def run(ctx: StageContext) -> dict[str, float]:
    p = ctx.params.presto_ls
    device, teacher, edm = load_inputs(ctx, p)
    net = load_presto_l(ctx.upstream("presto_l"), teacher, edm, device)
    schedule = BudgetSchedule(p.schedule, net.cfg.depth, reroute=True)
    ctx.tracker.set_tags({"budgets": json.dumps(schedule.budgets)})
    summary = distil(ctx, p, device, teacher, edm, BudgetedDenoiser(net, edm["sigma_data"], schedule))
    (ctx.out_dir / RECIPE_FILE).write_text(with_budgets(p.recipe, schedule).model_dump_json(indent=2) + "\n")
    save_schedule(schedule, ctx.out_dir / SCHEDULE_FILE)
    return summary | {"min_budget": float(min(schedule.budgets)),
                      "recipe_block_fraction": expected_compute(schedule, p.recipe.sigmas())}
