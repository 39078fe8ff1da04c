"""Where in sigma a trained DiT can lose blocks: the data for choosing a layer-budget schedule.

For the base model train_dit trained (no fine-tuning), at every noise level a sampler visits, the validation
loss (presto.training.dit_trainer.validation_loss: fixed clips, fixed noise) when only `b` of its blocks run,
divided by the loss with all of them, for b = 2 .. depth - 1, in both ways of dropping:
- reroute (Presto-L): the first b - 1 blocks, then the last block;
- exit (ASE): the first b blocks straight to the output layer.
A ratio near 1 means those blocks do little at that noise level; fine-tuning (presto_l, ase) recovers part
of the rest. Then each schedule (params.yaml's presto_l and presto_ls schedules, and any `--schedule`) is
scored on the grids it is sampled on: the fraction of block evaluations it runs and the mean loss ratio
of its budgets over the grid's levels (reroute).

    .venv/bin/python bench/layer_sensitivity.py --artifacts artifacts --clips 32
    .venv/bin/python bench/layer_sensitivity.py --schedule 28,28,24,10,8@0.085,0.97,5.8,24.4
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from presto.config import load_params  # noqa: E402
from presto.diffusion.edm import Denoiser  # noqa: E402
from presto.distill.presto_l import (  # noqa: E402
    BudgetedDenoiser,
    BudgetSchedule,
    BudgetScheduleConfig,
    expected_compute,
)
from presto.training.dit_trainer import validation_loss  # noqa: E402
from stages.presto_l import load_teacher  # noqa: E402
from stages.train_dit import _open_val, _validation_batches  # noqa: E402


def fixed_budget(net: torch.nn.Module, sigma_data: float, budget: int, reroute: bool) -> Denoiser:
    """The DiT run at one budget at every noise level: a one-band schedule counted out of its own depth."""
    depth = net.cfg.depth
    cfg = BudgetScheduleConfig(reference_depth=depth, budgets=[budget], sigma_bounds=[])
    return BudgetedDenoiser(net, sigma_data, BudgetSchedule(cfg, depth, reroute))


def loss_ratios(teacher: torch.nn.Module, sigma_data: float, batches: list, sigmas: list[float],
                seed: int) -> dict[tuple[str, int], list[float]]:
    """{(mode, budget): [loss at budget / loss at full depth, per sigma]}."""
    cpu = torch.device("cpu")

    def losses(denoiser: Denoiser) -> list[float]:
        scores = validation_loss(denoiser, batches, sigmas, seed, cpu)
        return [scores[f"val_loss_sigma_{s:g}"] for s in sigmas]

    full = losses(Denoiser(teacher, sigma_data))
    out = {}
    for mode, reroute in (("reroute", True), ("exit", False)):
        for budget in range(2, teacher.cfg.depth):
            out[mode, budget] = [b / f for b, f in zip(losses(fixed_budget(teacher, sigma_data, budget, reroute)), full)]
            print(f"  measured {mode} {budget}", file=sys.stderr, flush=True)
    return out


def score_schedule(schedule: BudgetSchedule, grid: torch.Tensor, levels: list[float],
                   ratios: dict[tuple[str, int], list[float]]) -> tuple[float, float]:
    """(fraction of block evaluations, mean reroute loss ratio of its budgets) over a sampling grid's positive
    levels, each of which must be one of `levels` (where `ratios` was measured); full depth counts 1."""
    index = {s: i for i, s in enumerate(levels)}
    visited = [float(s) for s in grid if s > 0]
    budgets = schedule(torch.tensor(visited)).tolist()
    mean = math.fsum(1.0 if b >= schedule.depth else ratios["reroute", b][index[s]] for s, b in zip(visited, budgets))
    return expected_compute(schedule, grid), mean / len(visited)


def parse_schedule(text: str) -> BudgetScheduleConfig:
    """'28,24,20,16,12@0.085,0.97,5.8,24.4' -> budgets of 28 and band tops."""
    budgets, _, bounds = text.partition("@")
    return BudgetScheduleConfig(reference_depth=28, budgets=[int(b) for b in budgets.split(",")],
                                sigma_bounds=[float(s) for s in bounds.split(",")] if bounds else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=REPO / "artifacts", help="holds train_dit/ and encode/")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--clips", type=int, default=32, help="validation clips (first caption, first 128 frames)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--schedule", action="append", default=[], help="budgets of 28@band tops, e.g. "
                    "28,28,24,10,8@0.085,0.97,5.8,24.4 (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    teacher, edm = load_teacher(args.artifacts / "train_dit", args.artifacts / "encode", torch.device("cpu"))
    batches = _validation_batches(_open_val(args.artifacts / "encode"), args.clips, 128, 8)
    if not batches:
        sys.exit(f"{args.artifacts / 'encode'}: no validation clips")
    grids = {"base": params.generate.recipe, "few-step": params.presto_ls.recipe}
    levels = sorted({float(s) for r in grids.values() for s in r.sigmas() if s > 0}, reverse=True)
    ratios = loss_ratios(teacher, edm["sigma_data"], batches, levels, params.shared.seed)
    depth = teacher.cfg.depth

    print(f"# teacher: {args.artifacts / 'train_dit'} (depth {depth}), {sum(len(b[0]) for b in batches)} val clips")
    print("\nloss at budget / loss at full depth, per noise level the samplers visit\n")
    keys = sorted(ratios)
    print("| sigma | " + " | ".join(f"{m} {b}" for m, b in keys) + " |")
    print("|---:|" + "---:|" * len(keys))
    for i, s in enumerate(levels):
        print(f"| {s:.3g} | " + " | ".join(f"{ratios[k][i]:.3f}" for k in keys) + " |")

    schedules = {"presto_l (layer_dropping)": params.layer_dropping.recipe.schedule,
                 "presto_ls": params.presto_ls.schedule} | {f"--schedule {s}": parse_schedule(s) for s in args.schedule}
    print("\nschedules (reroute): fraction of block evaluations / mean loss ratio over each grid's levels\n")
    print("| schedule | budgets at depth " + str(depth) + " | " + " | ".join(grids) + " |")
    print("|---|---|" + "---|" * len(grids))
    for name, cfg in schedules.items():
        schedule = BudgetSchedule(cfg, depth, reroute=True)
        scores = [score_schedule(schedule, recipe.sigmas(), levels, ratios) for recipe in grids.values()]
        cells = [f"{fraction:.3f} / {mean:.3f}" for fraction, mean in scores]
        print(f"| {name} | {schedule.budgets} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
