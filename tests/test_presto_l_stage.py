"""The presto_l and ase stage bodies, in-process on a synthetic encode output and a tiny teacher: they write a
loadable budgeted model and its schedule, log curves, and a rerun after a crash resumes from the checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from presto.config import Params, load_params
from presto.distill.presto_l import PrestoLTrainer, load_schedule
from presto.errors import InputError
from presto.generation import EDM_FILE, MODEL_DIR
from presto.models.checkpoint import load_model, save_model
from presto.models.dit import DiT, DiTConfig
from stages import presto_l as stage
from stages.base import StageContext
from recording_tracker import RecordingTracker
from test_train_dit_stage import C, D, make_encode_output  # the synthetic encode output train_dit's test uses

REPO = Path(__file__).resolve().parents[1]
EDM = {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """encode's output and a tiny, lightly randomised teacher as train_dit would leave them."""
    make_encode_output(tmp_path / "artifacts")
    cfg = DiTConfig(latent_channels=C, width=32, depth=4, heads=2, mlp_ratio=2.0, text_dim=D,
                    budget_conditioning=False)
    torch.manual_seed(0)
    teacher = DiT(cfg)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not the all-zero output of a fresh DiT
    folder = tmp_path / "artifacts" / "train_dit"
    save_model(teacher, cfg, folder / MODEL_DIR)
    (folder / EDM_FILE).write_text(json.dumps(EDM))
    return tmp_path


def tiny_params(**layer_dropping) -> Params:
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["layer_dropping"] |= {"batch": 4, "crop_frames": 16, "steps": 4, "log_every": 2, "ckpt_every": 2,
                              "val_every": 4, "val_clips": 4, "val_sigmas": [0.3, 40.0],
                              "resources": {"cpus": 1, "gpus": 0}} | layer_dropping
    return Params.model_validate(raw)


def context(root: Path, name: str, params: Params, out: str, tracker: RecordingTracker) -> StageContext:
    return StageContext(name=name, params=params, root=root, out_dir=root / out,
                        checkpoint_dir=root / "checkpoints" / name / "fp", fingerprint="fp", tracker=tracker)


def test_presto_l_writes_a_budgeted_model_and_its_schedule(project: Path):
    tracker = RecordingTracker()
    metrics = stage.run(context(project, "presto_l", tiny_params(), "out", tracker))
    model, cfg = load_model(project / "out" / MODEL_DIR)
    teacher, _ = load_model(project / "artifacts" / "train_dit" / MODEL_DIR)
    assert isinstance(model, DiT) and cfg.budget_conditioning and cfg.depth == 4
    assert model.budget_embed.weight.abs().sum() > 0  # trained away from its zero start
    schedule = load_schedule(project / "out" / stage.SCHEDULE_FILE)
    assert schedule.budgets == [4, 3, 3, 2, 2] and schedule.reroute and schedule.depth == 4
    assert json.loads((project / "out" / EDM_FILE).read_text()) == EDM
    assert tracker.tags["mode"] == "presto_l"
    assert tracker.steps_with("train_loss") == [2, 4] and tracker.steps_with("val_loss") == [4]
    for key in ("train_loss", "train_dsm", "train_self_distill", "val_loss", "teacher_val_loss",
                "val_loss_sigma_40", "teacher_val_loss_sigma_40"):
        assert np.isfinite(metrics[key]), key
    assert metrics["train_self_distill"] > 0 and metrics["resumed_from_step"] == 0 and metrics["steps"] == 4
    assert metrics["min_budget"] == 2
    assert not (project / "checkpoints" / "presto_l" / "fp" / "step-00000004").exists()  # the out is the result


def test_ase_is_the_same_recipe_without_budget_conditioning_or_reroute(project: Path):
    metrics = stage.run(context(project, "ase", tiny_params(), "out", RecordingTracker()))
    _, cfg = load_model(project / "out" / MODEL_DIR)
    assert not cfg.budget_conditioning
    schedule = load_schedule(project / "out" / stage.SCHEDULE_FILE)
    assert not schedule.reroute and schedule.budgets == [4, 3, 3, 2, 2]  # presto_l's: equal compute
    assert metrics["train_self_distill"] == 0  # ase.nu_self_distill = 0 in params.yaml
    config = stage.fine_tune_config(context(project, "ase", tiny_params(), "x", RecordingTracker()))
    assert config.mode == "ase" and config.recipe == tiny_params().layer_dropping.recipe
    with pytest.raises(ValueError, match="not 'train_dit'"):
        stage.fine_tune_config(context(project, "train_dit", tiny_params(), "x", RecordingTracker()))


@pytest.mark.parametrize("mode, budget_conditioning, reroute", [("embed_only", True, False),
                                                                 ("reroute_only", False, True)])
def test_presto_l_mode_trains_an_ablation_with_one_of_the_two_changes(project: Path, mode, budget_conditioning,
                                                                       reroute):
    params = tiny_params()
    raw = params.model_dump(mode="json")
    raw["presto_l"]["mode"] = mode
    tracker = RecordingTracker()
    stage.run(context(project, "presto_l", Params.model_validate(raw), "out", tracker))
    model, cfg = load_model(project / "out" / MODEL_DIR)
    assert cfg.budget_conditioning == budget_conditioning
    assert (model.budget_embed is not None) == budget_conditioning
    assert load_schedule(project / "out" / stage.SCHEDULE_FILE).reroute == reroute
    assert tracker.tags["mode"] == mode
    raw["presto_l"]["mode"] = "exit_only"
    with pytest.raises(ValueError, match="presto_l.mode"):
        Params.model_validate(raw)


def test_a_rerun_after_a_crash_resumes_from_the_checkpoint_exactly(project: Path, monkeypatch):
    params = tiny_params()
    stage.run(context(project, "presto_l", params, "straight", RecordingTracker()))
    (project / "checkpoints").rename(project / "checkpoints-straight")

    step_once = PrestoLTrainer.train_step

    def crash_at_step_3(self, step, latents, cond):
        if step == 3:
            raise RuntimeError("worker lost")
        return step_once(self, step, latents, cond)

    monkeypatch.setattr(PrestoLTrainer, "train_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="worker lost"):
        stage.run(context(project, "presto_l", params, "crashed", RecordingTracker()))
    monkeypatch.setattr(PrestoLTrainer, "train_step", step_once)

    tracker = RecordingTracker()
    metrics = stage.run(context(project, "presto_l", params, "resumed", tracker))
    assert metrics["resumed_from_step"] == 2
    assert tracker.steps_with("train_loss") == [4]  # steps 1-2 were not trained again
    straight, _ = load_model(project / "straight" / MODEL_DIR)
    resumed, _ = load_model(project / "resumed" / MODEL_DIR)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_inputs_that_do_not_fit_are_named(project: Path):
    encode = project / "artifacts" / "encode"
    teacher_dir = project / "artifacts" / "train_dit"
    (teacher_dir / EDM_FILE).write_text(json.dumps(EDM | {"sigma_data": 1.0}))
    with pytest.raises(InputError, match="sigma_data"):
        stage.load_teacher(teacher_dir, encode, torch.device("cpu"))
    (teacher_dir / EDM_FILE).write_text(json.dumps(EDM))
    cfg = DiTConfig(latent_channels=C, width=32, depth=4, heads=2, mlp_ratio=2.0, text_dim=8, budget_conditioning=False)
    save_model(DiT(cfg), cfg, teacher_dir / MODEL_DIR)
    with pytest.raises(InputError, match="text embeddings are 384-d"):
        stage.load_teacher(teacher_dir, encode, torch.device("cpu"))
    with pytest.raises(InputError, match="edm.json: not found"):
        stage.load_teacher(project / "nowhere", encode, torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            stage.run(context(project, "presto_l", tiny_params(resources={"cpus": 1, "gpus": 1}), "out",
                              RecordingTracker()))


def run_at_seeds(project: Path, stage_module, name: str, params_at) -> dict[str, tuple[dict, torch.Tensor]]:
    """Stage `name` at its seed null, shared.seed and shared.seed + 1, each from scratch: {label: (metrics,
    the model's weights flattened)}; checks that null means shared.seed and that another seed trains another model."""
    shared = params_at(None).shared.seed
    runs = {}
    for label, seed in [("default", None), ("same", shared), ("other", shared + 1)]:
        metrics = stage_module.run(context(project, name, params_at(seed), label, RecordingTracker()))
        shutil.rmtree(project / "checkpoints")  # each run from scratch, not resumed from the last one's state
        model, _ = load_model(project / label / MODEL_DIR)
        runs[label] = metrics, torch.cat([w.flatten() for w in model.state_dict().values()])
    torch.testing.assert_close(runs["same"][1], runs["default"][1])  # null means shared.seed
    assert not torch.allclose(runs["other"][1], runs["default"][1])  # other batches and noise
    return runs


def test_the_fine_tune_seed_repeats_the_fine_tune_on_the_same_validation_noise(project: Path):
    runs = run_at_seeds(project, stage, "presto_l", lambda seed: tiny_params(seed=seed))
    assert runs["other"][0]["teacher_val_loss"] == runs["default"][0]["teacher_val_loss"]  # same val noise
