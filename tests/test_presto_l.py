"""Presto-L and the ASE baseline: the budget schedule, the loss, compute really saved, fine-tuning."""

from __future__ import annotations

import itertools
import json
from typing import get_args

import pytest
import torch
from pydantic import ValidationError

from presto.config import LayerDropMode
from presto.diffusion.edm import Denoiser, edm_loss
from presto.diffusion.noise import rho_schedule
from presto.diffusion.sampling import karras_sigmas, sample_euler
from presto.distill.presto_l import (
    MODE_PARTS,
    BudgetedDenoiser,
    BudgetSchedule,
    BudgetScheduleConfig,
    LayerDropRecipe,
    PrestoLConfig,
    PrestoLTrainer,
    expected_compute,
    load_schedule,
    presto_l_loss,
    save_schedule,
    scale_budget,
    student_from_teacher,
)
from presto.errors import InputError
from presto.models.dit import DiT, DiTConfig, layer_schedule
from presto.text.condition import TextCondition
from presto.training.state import latest_state

C, T, D = 4, 12, 8  # latent channels, frames, text_dim
SIGMA_DATA = 0.5
CPU = torch.device("cpu")
# ASE's DiT budgets over the Karras rho = 7 grid on [0.002, 80] cut into five equal parts.
ASE = BudgetScheduleConfig(reference_depth=28, budgets=[28, 24, 20, 16, 12], sigma_bounds=[0.085, 0.97, 5.8, 24.4])
# A depth-6 test schedule: full depth below sigma 0.3, 4 blocks up to 2, then 2 blocks.
TINY = BudgetScheduleConfig(reference_depth=6, budgets=[6, 4, 2], sigma_bounds=[0.3, 2.0])


def dit_cfg(depth: int = 6, budget_conditioning: bool = False) -> DiTConfig:
    return DiTConfig(latent_channels=C, width=32, depth=depth, heads=2, mlp_ratio=2.0, text_dim=D,
                     budget_conditioning=budget_conditioning)


def make_cond(batch: int, length: int = 3) -> TextCondition:
    return TextCondition(torch.randn(batch, length, D), torch.ones(batch, length, dtype=torch.bool),
                         torch.randn(batch, D))


def randomized_teacher(depth: int = 6) -> DiT:
    model = DiT(dit_cfg(depth))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def train_cfg(mode: str, nu: float, lr: float = 1e-3) -> PrestoLConfig:
    recipe = LayerDropRecipe(lr=lr, betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0, ema_decay=0.9,
                             cond_dropout=0.1, schedule=TINY,
                             sigma={"kind": "inf", "sigma_min": 0.02, "sigma_max": 20.0, "rho": 7.0})
    return PrestoLConfig(mode=mode, nu_self_distill=nu, recipe=recipe)


def record_block_calls(model: DiT) -> list[tuple[int, int]]:
    """(block index, batch size) of every block forward, appended as they run."""
    calls: list[tuple[int, int]] = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda _m, args, i=i: calls.append((i, args[0].shape[0])))
    return calls


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Tiny tensors: on a shared 2-core machine a second intra-op thread only contends.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ---- schedule ---------------------------------------------------------------------------------------------

def test_ase_schedule_at_28_blocks_and_scaled_to_other_depths():
    assert BudgetSchedule(ASE, 28, reroute=True).budgets == [28, 24, 20, 16, 12]
    assert BudgetSchedule(ASE, 12, reroute=True).budgets == [12, 10, 9, 7, 5]  # 10.29, 8.57, 6.86, 5.14
    assert BudgetSchedule(ASE, 6, reroute=True).budgets == [6, 5, 4, 3, 3]  # 5.14, 4.29, 3.43, 2.57
    assert BudgetSchedule(ASE, 4, reroute=True).budgets == [4, 3, 3, 2, 2]  # 3.43, 2.86, 2.29, 1.71
    # The reroute always runs the last block, so it keeps at least one intermediate block: never below 2; and
    # ASE gets the same floor, so that both modes run the same blocks per noise level (1.71, 1.43, 1.14, 0.86).
    assert BudgetSchedule(ASE, 2, reroute=True).budgets == [2, 2, 2, 2, 2]
    assert BudgetSchedule(ASE, 2, reroute=False).budgets == [2, 2, 2, 2, 2]
    assert BudgetSchedule(ASE, 1, reroute=False).budgets == [1, 1, 1, 1, 1]  # nothing to drop, but no error
    with pytest.raises(ValueError, match="depth of 1"):
        BudgetSchedule(ASE, 1, reroute=True)
    assert scale_budget(5, 10, 5, minimum=1) == 3  # 2.5 rounds half up (Python's round would give 2)
    assert scale_budget(7, 10, 5, minimum=1) == 4  # 3.5
    assert scale_budget(1, 28, 4, minimum=2) == 2


def test_budget_never_grows_with_sigma_and_bounds_close_the_lower_band():
    schedule = BudgetSchedule(ASE, 28, reroute=True)
    budgets = schedule(torch.logspace(-3, 2, 500)).tolist()
    assert budgets[0] == 28 and budgets[-1] == 12
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert sorted(set(budgets)) == [12, 16, 20, 24, 28]
    edges = torch.tensor([0.085, 0.0851, 24.4, 24.41])
    assert schedule(edges).tolist() == [28, 24, 16, 12]


def test_budget_per_item_in_a_batch():
    schedule = BudgetSchedule(TINY, 6, reroute=True)
    sigma = torch.tensor([0.01, 30.0, 1.0, 0.3, 2.5])
    budget = schedule(sigma)
    assert budget.dtype == torch.int64 and budget.tolist() == [6, 2, 4, 6, 2]
    assert schedule.levels() == [(0.3, 6), (2.0, 4), (float("inf"), 2)]


@pytest.mark.parametrize("changes, message", [
    (dict(sigma_bounds=[0.3]), "need 2"),
    (dict(sigma_bounds=[2.0, 0.3]), "strictly increasing"),
    (dict(budgets=[7, 4, 2]), "must not exceed reference_depth"),
    (dict(budgets=[6, 2, 4]), "must not increase with sigma"),
    (dict(budgets=[6, 0, 0]), "greater than 0"),
    (dict(sigma_bounds=[-1.0, 2.0]), "greater than 0"),
])
def test_schedule_config_rejects_bad_values(changes, message):
    with pytest.raises(ValidationError, match=message):
        BudgetScheduleConfig(**(TINY.model_dump() | changes))


def test_expected_compute_on_a_karras_grid():
    schedule = BudgetSchedule(ASE, 28, reroute=True)
    sigmas = karras_sigmas(10, 0.002, 80.0, 7.0)
    # Grid point i sits at u = i / 9 on the rho grid, the bands at u = 0.2, 0.4, 0.6, 0.8: two points per band.
    assert schedule(sigmas[:-1]).tolist() == [12, 12, 16, 16, 20, 20, 24, 24, 28, 28]
    assert expected_compute(schedule, sigmas) == pytest.approx(2 * (12 + 16 + 20 + 24 + 28) / (10 * 28))
    assert expected_compute(schedule, torch.tensor([0.05, 0.01, 0.0])) == 1.0
    # The default bounds are that grid's band edges, rounded.
    edges = rho_schedule(torch.tensor([0.8, 0.6, 0.4, 0.2], dtype=torch.float64), 0.002, 80.0, 7.0)
    torch.testing.assert_close(edges, torch.tensor(ASE.sigma_bounds, dtype=torch.float64), rtol=0.02, atol=0)
    with pytest.raises(ValueError, match="no positive"):
        expected_compute(schedule, torch.zeros(1))


def test_schedule_file_round_trip(tmp_path):
    schedule = BudgetSchedule(ASE, 12, reroute=False)
    path = save_schedule(schedule, tmp_path / "schedule.json")
    data = json.loads(path.read_text())
    assert [level["budget"] for level in data["levels"]] == [12, 10, 9, 7, 5] and data["levels"][-1]["sigma_max"] is None
    loaded = load_schedule(path)
    assert (loaded.budgets, loaded.depth, loaded.reroute, loaded.cfg) == (schedule.budgets, 12, False, ASE)
    path.write_text(json.dumps(data | {"depth": 0}))
    with pytest.raises(InputError, match="invalid budget schedule"):
        load_schedule(path)
    path.write_text("{}")
    with pytest.raises(InputError, match="not a budget schedule"):
        load_schedule(path)
    with pytest.raises(InputError, match="unreadable"):
        load_schedule(tmp_path / "missing.json")


# ---- loss ---------------------------------------------------------------------------------------------

def test_loss_is_plain_dsm_when_nu_is_zero():
    student = Denoiser(student_from_teacher(randomized_teacher(), budget_conditioning=True), SIGMA_DATA)
    with torch.no_grad():
        student.net.budget_embed.weight.normal_()
    x0, noise, cond = torch.randn(3, C, T) * 0.5, torch.randn(3, C, T), make_cond(3)
    sigma, budget = torch.tensor([0.1, 1.0, 10.0]), torch.tensor([6, 4, 2])
    parts = presto_l_loss(student, None, x0, sigma, cond, noise, budget, 0.0, reroute=True)
    reference = edm_loss(student, x0, sigma, cond, noise, budget=budget, reroute=True)
    torch.testing.assert_close(parts.total, reference)
    torch.testing.assert_close(parts.dsm, reference)
    # The budgeted denoiser is a Denoiser: edm_loss takes it, with the schedule choosing these same budgets.
    scheduled = BudgetedDenoiser(student.net, SIGMA_DATA, BudgetSchedule(TINY, 6, reroute=True))
    torch.testing.assert_close(edm_loss(scheduled, x0, sigma, cond, noise), reference)
    assert torch.equal(parts.self_distill, torch.zeros(3))
    with pytest.raises(ValueError, match="needs a teacher"):
        presto_l_loss(student, None, x0, sigma, cond, noise, budget, 0.1, reroute=True)


def test_self_distillation_vanishes_at_full_budget_and_matches_its_formula_below():
    teacher = Denoiser(randomized_teacher(), SIGMA_DATA)
    student = Denoiser(student_from_teacher(teacher.net, budget_conditioning=True), SIGMA_DATA)
    x0, noise, cond = torch.randn(2, C, T) * 0.5, torch.randn(2, C, T), make_cond(2)
    sigma = torch.tensor([0.2, 3.0])
    full = presto_l_loss(student, teacher, x0, sigma, cond, noise, 6, 0.1, reroute=True)
    assert torch.equal(full.self_distill, torch.zeros(2))
    torch.testing.assert_close(full.total, full.dsm)

    low = presto_l_loss(student, teacher, x0, sigma, cond, noise, 3, 0.1, reroute=True)
    # EDM's preconditioning and weight written out: D = c_skip x + c_out F(c_in x; ln(sigma) / 4).
    noisy = x0 + sigma[:, None, None] * noise
    s2, sd2 = sigma[:, None, None] ** 2, SIGMA_DATA**2
    c_skip, c_out, c_in = sd2 / (s2 + sd2), (s2 * sd2 / (s2 + sd2)).sqrt(), 1 / (s2 + sd2).sqrt()
    with torch.no_grad():
        d_student = c_skip * noisy + c_out * student.net(c_in * noisy, sigma.log() / 4, cond, budget=3)
        d_teacher = c_skip * noisy + c_out * teacher.net(c_in * noisy, sigma.log() / 4, cond)
    weight = (sigma**2 + sd2) / (sigma**2 * sd2)
    torch.testing.assert_close(low.self_distill, weight * (d_student - d_teacher).square().mean(dim=(1, 2)),
                               rtol=1e-4, atol=1e-6)
    assert (low.self_distill > 0).all()
    torch.testing.assert_close(low.total, low.dsm + 0.1 * low.self_distill)


def test_gradients_never_reach_the_teacher():
    teacher = Denoiser(randomized_teacher(), SIGMA_DATA)
    assert all(p.requires_grad for p in teacher.parameters())  # not frozen: the loss itself must stop it
    student = Denoiser(student_from_teacher(teacher.net, budget_conditioning=True), SIGMA_DATA)
    x0, noise, cond = torch.randn(2, C, T) * 0.5, torch.randn(2, C, T), make_cond(2)
    parts = presto_l_loss(student, teacher, x0, torch.tensor([0.5, 5.0]), cond, noise, 3, 0.1, reroute=True)
    parts.self_distill.sum().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.net.blocks[0].qkv.weight.grad.abs().sum() > 0


def test_student_from_teacher_starts_at_the_teachers_function():
    teacher = randomized_teacher()
    student = student_from_teacher(teacher, budget_conditioning=True)
    assert student.cfg.budget_conditioning and torch.equal(student.budget_embed.weight, torch.zeros(6, 32))
    x, c_noise, cond = torch.randn(2, C, T), torch.randn(2), make_cond(2)
    for budget in (2, 4, 6):
        assert torch.equal(student(x, c_noise, cond, budget=budget),
                           teacher(x, c_noise, cond, blocks=layer_schedule(budget, 6, reroute=True)))
    assert torch.equal(student_from_teacher(teacher, False)(x, c_noise, cond, budget=3, reroute=False),
                       teacher(x, c_noise, cond, blocks=[0, 1, 2]))
    with pytest.raises(ValueError, match="would drop"):
        student_from_teacher(student, budget_conditioning=False)


# ---- compute really saved -------------------------------------------------------------------------------

def test_every_mode_the_params_accept_has_its_parts():
    assert set(MODE_PARTS) == set(get_args(LayerDropMode))
    assert sorted(MODE_PARTS.values()) == sorted(itertools.product([False, True], repeat=2))  # each pair once


@pytest.mark.parametrize("mode", list(MODE_PARTS))
def test_sampling_runs_only_the_scheduled_blocks(mode):
    budget_conditioning, reroute = MODE_PARTS[mode]
    net = student_from_teacher(randomized_teacher(), budget_conditioning=budget_conditioning)
    schedule = BudgetSchedule(TINY, 6, reroute=reroute)
    calls = record_block_calls(net)
    evaluated: list[float] = []
    budgeted = BudgetedDenoiser(net, SIGMA_DATA, schedule)

    def spy(x, sigma, cond):
        evaluated.append(float(sigma[0]))
        return budgeted(x, sigma, cond)

    sigmas = karras_sigmas(8, 0.02, 20.0, 7.0)
    sample_euler(spy, 20.0 * torch.randn(2, C, T), sigmas, cond=make_cond(2))
    assert evaluated == pytest.approx(sigmas[:-1].tolist())
    expected = [i for s in evaluated for i in layer_schedule(int(schedule(torch.tensor(s))), 6, reroute)]
    assert [i for i, _ in calls] == expected
    assert all(batch == 2 for _, batch in calls)
    # The first (noisiest) step runs 2 blocks: block 0, then block 5 with the reroute, block 1 without.
    assert expected[:2] == ([0, 5] if reroute else [0, 1]) and expected[-6:] == list(range(6))
    assert len(calls) < 6 * len(evaluated)
    assert len(calls) == pytest.approx(expected_compute(schedule, sigmas) * 6 * len(evaluated))


def test_items_at_different_noise_run_different_blocks_and_match_running_alone():
    net = student_from_teacher(randomized_teacher(), budget_conditioning=True)
    with torch.no_grad():
        net.budget_embed.weight.normal_()
    budgeted = BudgetedDenoiser(net, SIGMA_DATA, BudgetSchedule(TINY, 6, reroute=True))
    x, sigma, cond = torch.randn(3, C, T), torch.tensor([0.05, 8.0, 0.05]), make_cond(3)
    calls = record_block_calls(net)
    out = budgeted(x, sigma, cond)
    assert sorted(calls) == sorted([(i, 2) for i in range(6)] + [(0, 1), (5, 1)])
    for i in range(3):
        one = torch.tensor([i])
        torch.testing.assert_close(out[one], budgeted(x[one], sigma[one], cond.select(one)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="depth 6"):
        BudgetedDenoiser(DiT(dit_cfg(depth=4)), SIGMA_DATA, BudgetSchedule(TINY, 6, reroute=True))


# ---- fine-tuning -------------------------------------------------------------------------------------------

def captioned_latents(batch: int) -> tuple[torch.Tensor, TextCondition]:
    """One latent per caption (a per-caption amplitude per channel on a fixed wave, std about sigma_data):
    a task a tiny DiT learns in a few dozen steps, with an exact answer at every noise level."""
    wave = (2 ** 0.5) * torch.cos(torch.arange(T) / 2)
    return SIGMA_DATA * torch.randn(batch, C, 1) * wave, make_cond(batch)


def train_teacher(x0: torch.Tensor, cond: TextCondition, steps: int) -> DiT:
    teacher = DiT(dit_cfg())
    denoiser = Denoiser(teacher, SIGMA_DATA)
    opt = torch.optim.Adam(teacher.parameters(), lr=5e-3)
    for _ in range(steps):
        sigma = (torch.randn(x0.shape[0]) * 1.2 - 0.4).exp()
        loss = edm_loss(denoiser, x0, sigma, cond, torch.randn_like(x0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher


@pytest.mark.parametrize("mode, nu", [("presto_l", 0.1), ("ase", 0.0), ("embed_only", 0.1), ("reroute_only", 0.0)])
def test_fine_tuning_lowers_the_loss_at_low_budgets(mode, nu):
    x0, cond = captioned_latents(16)
    teacher = train_teacher(x0, cond, steps=80)
    trainer = PrestoLTrainer(student_from_teacher(teacher, MODE_PARTS[mode][0]), train_cfg(mode, nu, lr=3e-3),
                             teacher, sigma_data=SIGMA_DATA, device=CPU, seed=0)
    noise = torch.randn_like(x0)
    sigma = torch.tensor([2.5, 5.0]).repeat_interleave(8)  # the top band: 2 of 6 blocks
    assert trainer.schedule(sigma).unique().tolist() == [2]

    def low_budget_loss() -> float:
        with torch.no_grad():
            return presto_l_loss(trainer.student, None, x0, sigma, cond, noise, 2, 0.0,
                                 reroute=trainer.cfg.reroute).dsm.mean().item()

    teacher_before = [p.clone() for p in teacher.parameters()]
    before = low_budget_loss()
    for step in range(40):
        metrics = trainer.train_step(step, x0, cond)
    assert set(metrics) == {"loss", "dsm", "self_distill", "grad_norm"}
    assert (metrics["self_distill"] > 0) == (nu > 0)
    assert low_budget_loss() < 0.9 * before
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))


def test_trainer_checks_the_student_and_resumes_exactly(tmp_path):
    teacher = randomized_teacher()
    with pytest.raises(ValueError, match="budget_conditioning = True"):
        PrestoLTrainer(student_from_teacher(teacher, False), train_cfg("presto_l", 0.1), teacher,
                       sigma_data=SIGMA_DATA, device=CPU, seed=0)
    with pytest.raises(ValueError, match="needs a teacher"):
        PrestoLTrainer(student_from_teacher(teacher, False), train_cfg("ase", 0.1), None,
                       sigma_data=SIGMA_DATA, device=CPU, seed=0)
    batches = [(torch.randn(4, C, T) * 0.5, make_cond(4)) for _ in range(4)]

    def trainer() -> PrestoLTrainer:
        return PrestoLTrainer(student_from_teacher(teacher, True), train_cfg("presto_l", 0.1), teacher,
                              sigma_data=SIGMA_DATA, device=CPU, seed=7)

    straight = trainer()
    losses = [straight.train_step(step, *batch)["loss"] for step, batch in enumerate(batches)]

    first = trainer()
    resumed_losses = [first.train_step(step, *batch)["loss"] for step, batch in enumerate(batches[:2])]
    first.save(tmp_path, 2, {"note": "half way"})
    second = trainer()
    assert second.load(latest_state(tmp_path)) == (2, {"note": "half way"})
    resumed_losses += [second.train_step(step, *batch)["loss"] for step, batch in enumerate(batches) if step >= 2]
    assert resumed_losses == pytest.approx(losses, rel=1e-6)
    for a, b in zip(straight.dit.parameters(), second.dit.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(straight.ema_model().parameters(), second.ema_model().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
