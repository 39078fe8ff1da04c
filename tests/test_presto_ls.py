"""Presto-LS: Presto-S with the Presto-L network as the generator. Block calls counted with hooks show the
generator running its scheduled budget per input sigma while the real and fake scores run every block; the
stage, in-process on a synthetic encode output, a tiny teacher and a tiny Presto-L model, writes a generator
whose recipe carries its budgets (and sampling with them skips blocks), resumes after a crash, and refuses
an ASE model."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from presto.config import Params, load_params
from presto.diffusion.edm import Denoiser, per_item_sigma
from presto.distill.presto_l import (
    MODE_PARTS,
    SCHEDULE_FILE,
    BudgetedDenoiser,
    BudgetSchedule,
    BudgetScheduleConfig,
    load_schedule,
    save_schedule,
    student_from_teacher,
)
from presto.distill.presto_s import PrestoS
from presto.errors import InputError
from presto.generation import EDM_FILE, MODEL_DIR, Generator, SamplingRecipe
from presto.models.checkpoint import load_model, save_model
from presto.models.disc_head import DiscHead, DiscHeadConfig
from presto.models.dit import DiT, DiTBlock, DiTConfig, layer_schedule
from presto.text.condition import TextCondition
from stages import presto_ls as stage
from recording_tracker import RecordingTracker
from test_presto_l_stage import EDM, context, project  # noqa: F401 (project is a fixture)
from test_presto_s import make_cfg

REPO = Path(__file__).resolve().parents[1]
SD, DEPTH = 0.5, 4


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class BlockLog:
    """How many items each block of a denoiser's network runs on, per call of the denoiser; blocks run outside
    a call (the discriminator's hidden states go to the network directly) are counted in `outside`."""

    def __init__(self, denoiser: Denoiser):
        self.calls: list[tuple[torch.Tensor, Counter]] = []  # (sigma per item, {block: items})
        self.outside: Counter = Counter()
        self._current: Counter | None = None
        denoiser.register_forward_pre_hook(self._enter)
        denoiser.register_forward_hook(lambda *_: setattr(self, "_current", None))
        for i, block in enumerate(denoiser.net.blocks):
            block.register_forward_pre_hook(lambda _m, args, i=i: self._block(i, args[0].shape[0]))

    def _enter(self, _module, args) -> None:
        self._current = Counter()
        self.calls.append((per_item_sigma(args[1], args[0]).detach().clone(), self._current))

    def _block(self, i: int, items: int) -> None:
        (self._current if self._current is not None else self.outside)[i] += items


class EveryBlock:
    """While open: how many items each block index runs on, over every DiT forward, keyed by the DiT's
    budget_conditioning (in a presto_ls run only the generator has it)."""

    def __enter__(self) -> "EveryBlock":
        self.items: dict[bool, Counter] = {True: Counter(), False: Counter()}
        self._dit: DiT | None = None
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def _hook(self, module, args) -> None:
        if isinstance(module, DiT):
            self._dit = module
        elif isinstance(module, DiTBlock):
            index = next(i for i, b in enumerate(self._dit.blocks) if b is module)
            self.items[self._dit.cfg.budget_conditioning][index] += args[0].shape[0]

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def expected_blocks(schedule: BudgetSchedule, sigma: torch.Tensor) -> Counter:
    """{block: items} when each item runs the blocks of its own sigma's budget, with the reroute."""
    return Counter(b for s in sigma for b in layer_schedule(int(schedule(s)), schedule.depth, reroute=True))


def randomized_dit(budget_conditioning: bool = False) -> DiT:
    dit = DiT(DiTConfig(latent_channels=4, width=32, depth=DEPTH, heads=2, mlp_ratio=2.0, text_dim=12,
                        budget_conditioning=budget_conditioning))
    with torch.no_grad():  # off adaLN-Zero's zeros, so that every block changes the output
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return dit


def test_the_generator_runs_its_budget_per_sigma_and_the_scores_run_every_block():
    torch.manual_seed(0)
    teacher = Denoiser(randomized_dit(), SD)
    net = student_from_teacher(teacher.net, budget_conditioning=True)
    schedule = BudgetSchedule(BudgetScheduleConfig(reference_depth=4, budgets=[4, 3, 2], sigma_bounds=[0.5, 5.0]),
                              DEPTH, reroute=True)
    head = DiscHead(DiscHeadConfig(channels=8, n_blocks=2, groups=2, target_rate=2.8), in_width=32, frame_rate=21.5)
    method = PrestoS.from_teacher(teacher, head, make_cfg(critic_updates_per_generator=1),
                                  generator=BudgetedDenoiser(net, SD, schedule))
    assert method.generator.net is net  # trained in place, not a copy of the teacher
    assert not method.fake_score.net.cfg.budget_conditioning  # the fake score starts as the base, full depth
    gen, fake, real = BlockLog(method.generator), BlockLog(method.fake_score), BlockLog(teacher)

    batch = 16
    x = torch.randn(batch, 4, 16)
    cond = TextCondition(torch.randn(batch, 5, 12), torch.ones(batch, 5, dtype=torch.bool), torch.randn(batch, 12))
    metrics = method.train_step(x, cond)  # a critic and a generator turn
    assert "loss/dmd" in metrics and all(math.isfinite(v) for v in metrics.values())

    assert len(gen.calls) == 2  # x_gen of the critic turn, then of the generator turn
    for sigma, ran in gen.calls:
        assert ran == expected_blocks(schedule, sigma)
        assert set(schedule(sigma).tolist()) == {2, 3, 4}  # p_gen reached every band
        # Budget 2 above sigma 5 runs blocks 0 and 3 (the reroute), budget 3 up to it adds block 1, and only
        # budget 4, at sigma <= 0.5, runs block 2.
        assert ran[0] == ran[3] == batch
        assert ran[1] == int((sigma <= 5.0).sum()) < batch and ran[2] == int((sigma <= 0.5).sum()) < ran[1]
    assert not gen.outside
    full = Counter({i: batch for i in range(DEPTH)})
    assert len(real.calls) == 2 and all(ran == full for _, ran in real.calls)  # conditional and null caption
    assert len(fake.calls) == 2 and all(ran == full for _, ran in fake.calls)  # its DSM loss and the DMD term
    # The discriminator's features: the first half of the fake score, on the real and generated batches of the
    # critic turn and the generated one of the generator turn.
    assert fake.outside == Counter({0: 3 * batch, 1: 3 * batch})


# ---- the stage ------------------------------------------------------------------------------------------


def tiny_raw() -> dict:
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["presto_ls"]["method"] |= {"critic_updates_per_generator": 2}
    raw["presto_ls"] |= {"head": {"channels": 8, "n_blocks": 4, "groups": 2, "target_rate": 2.8},
                         "batch": 4, "crop_frames": 16, "iterations": 4, "log_every": 2, "ckpt_every": 2,
                         "eval_steps": [1, 2], "eval_clips": 4, "resources": {"cpus": 1, "gpus": 0}}
    return raw


def tiny_params() -> Params:
    return Params.model_validate(tiny_raw())


def write_presto_l(root: Path, mode: str = "presto_l") -> DiT:
    """presto_l's out folder as the stage leaves it: the teacher fine-tuned in `mode` (here: perturbed, the
    budget embedding included), its EDM constants and its schedule."""
    teacher, _ = load_model(root / "artifacts" / "train_dit" / MODEL_DIR)
    budget_conditioning, reroute = MODE_PARTS[mode]
    net = student_from_teacher(teacher, budget_conditioning=budget_conditioning)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = root / "artifacts" / "presto_l"
    save_model(net, net.cfg, folder / MODEL_DIR)
    (folder / EDM_FILE).write_text(json.dumps(EDM))
    save_schedule(BudgetSchedule(tiny_params().layer_dropping.recipe.schedule, DEPTH, reroute), folder / SCHEDULE_FILE)
    return net


def test_presto_ls_writes_a_budgeted_generator_whose_recipe_skips_blocks(project: Path):
    presto_l = write_presto_l(project)
    tracker = RecordingTracker()
    params = tiny_params()
    with EveryBlock() as blocks:
        metrics = stage.run(context(project, "presto_ls", params, "out", tracker))
    # The generator (training and scoring) skips block 2 at high noise (3 of 4 blocks: 0, 1 and the last); the
    # base networks (real and fake score) run all four, or the first half for the discriminator's features.
    generator_items, score_items = blocks.items[True], blocks.items[False]
    assert generator_items[2] < generator_items[1] == generator_items[0] == generator_items[3]
    assert score_items[0] == score_items[1] > score_items[2] == score_items[3] > 0

    out = project / "out"
    generator, cfg = load_model(out / MODEL_DIR)
    assert isinstance(generator, DiT) and cfg == presto_l.cfg and cfg.budget_conditioning
    assert any(not torch.equal(a, b) for a, b in zip(generator.state_dict().values(), presto_l.state_dict().values()))
    assert json.loads((out / EDM_FILE).read_text()) == EDM

    schedule = load_schedule(out / SCHEDULE_FILE)
    presto_l_budgets = BudgetSchedule(params.layer_dropping.recipe.schedule, DEPTH, reroute=True).budgets
    assert schedule.reroute and schedule.budgets == [4, 4, 4, 4, 3] and presto_l_budgets == [4, 3, 3, 2, 2]
    assert json.loads(tracker.tags["budgets"]) == schedule.budgets
    recipe = SamplingRecipe.model_validate_json((out / stage.RECIPE_FILE).read_text())
    assert recipe.model_dump() == params.presto_ls.recipe.model_dump() | {"budgets": [3, 4, 4, 4]}
    assert recipe.budgets == schedule(recipe.sigmas()[:recipe.steps]).tolist()  # sigmas 80, 17.5, 2.5, 0.17
    assert metrics["min_budget"] == 3 and metrics["recipe_block_fraction"] == pytest.approx(15 / 16)
    for key in ("train_loss_dsm", "train_loss_dmd", "latent_fd_1step", "latent_fd_2step", "init_latent_fd_1step"):
        assert math.isfinite(metrics[key]), key
    assert metrics["iterations"] == 4 and metrics["generator_updates"] == 2 and metrics["resumed_from_iteration"] == 0

    # Sampling with the recipe's budgets runs exactly the scheduled blocks and agrees with evaluate's way of
    # running the model (its schedule.json, per noise level, the recipe's budgets null).
    art = project / "artifacts"
    bundle = {"vae_dir": art / "train_vae" / MODEL_DIR, "encode_dir": art / "encode", "device": torch.device("cpu")}
    net, _ = load_model(out / MODEL_DIR)
    by_recipe = Generator.around(net, EDM["sigma_data"], **bundle)  # the bare network: the recipe's budgets
    ran: list[int] = []
    for i, block in enumerate(by_recipe.dit.blocks):
        block.register_forward_pre_hook(lambda _m, _a, i=i: ran.append(i))
    audio, timings = by_recipe.generate(["slow strings"], 0.25, [3], recipe)
    assert ran == [b for budget in recipe.budgets for b in layer_schedule(budget, DEPTH, reroute=True)]
    assert len(ran) == 15 < DEPTH * recipe.steps and timings["nfe"] == recipe.steps
    by_schedule = Generator.load(out, **bundle)
    assert isinstance(by_schedule.denoiser, BudgetedDenoiser)
    with pytest.raises(InputError, match="runs its own layer schedule"):
        by_schedule.generate(["slow strings"], 0.25, [3], recipe)
    same, _ = by_schedule.generate(["slow strings"], 0.25, [3], recipe.model_copy(update={"budgets": None}))
    torch.testing.assert_close(torch.from_numpy(same), torch.from_numpy(audio))


class CrashingTracker(RecordingTracker):
    """A tracker whose run dies when iteration `at` reports: the worker lost after that iteration trained."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def log_metrics(self, metrics, step=None):
        if step == self.at:
            raise RuntimeError("worker lost")
        super().log_metrics(metrics, step)


def test_a_rerun_after_a_crash_resumes_from_the_checkpoint_exactly(project: Path):
    write_presto_l(project)
    params = tiny_params()
    stage.run(context(project, "presto_ls", params, "straight", RecordingTracker()))
    (project / "checkpoints").rename(project / "checkpoints-straight")

    with pytest.raises(RuntimeError, match="worker lost"):
        stage.run(context(project, "presto_ls", params, "crashed", CrashingTracker(at=4)))
    assert [p.name for p in (project / "checkpoints" / "presto_ls" / "fp").iterdir()] == ["step-00000002"]

    tracker = RecordingTracker()
    metrics = stage.run(context(project, "presto_ls", params, "resumed", tracker))
    assert metrics["resumed_from_iteration"] == 2
    assert tracker.steps_with("loss/dsm") == [4]  # iterations 1-2 were not trained again
    straight, _ = load_model(project / "straight" / MODEL_DIR)
    resumed, _ = load_model(project / "resumed" / MODEL_DIR)
    # Equal only if the generator (and its optimiser) came back from the checkpoint: iterations 3-4 alone from
    # presto_l's weights would end elsewhere.
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["ase", "embed_only", "reroute_only"])
def test_an_ablation_is_refused(project: Path, mode: str):
    write_presto_l(project, mode=mode)
    with pytest.raises(InputError, match="holds an ablation"):
        stage.run(context(project, "presto_ls", tiny_params(), "out", RecordingTracker()))
