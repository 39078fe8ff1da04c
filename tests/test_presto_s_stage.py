"""The presto_s stage body, in-process on a synthetic encode output and a tiny teacher: it writes a loadable
generator with its sampling recipe, logs every loss term, resumes exactly after a crash, and stops on a NaN
keeping the last good checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import presto.distill.presto_s as presto_s_module
from presto.config import Params, load_params, parse_params
from presto.distill.presto_s import PrestoS
from presto.errors import DivergenceError, ParamsError
from presto.generation import EDM_FILE, MODEL_DIR, SamplingRecipe
from presto.models.checkpoint import load_model
from presto.models.dit import DiT
from presto.training.state import latest_state
from stages import presto_s as stage
from recording_tracker import RecordingTracker
from test_presto_l_stage import EDM, context, project, run_at_seeds  # noqa: F401 (project is a fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_raw() -> dict:
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["presto_s"]["method"] |= {"critic_updates_per_generator": 2}
    raw["presto_s"] |= {"head": {"channels": 8, "n_blocks": 4, "groups": 2, "target_rate": 2.8},
                        "batch": 4, "crop_frames": 16, "iterations": 4, "log_every": 2, "ckpt_every": 2,
                        "eval_steps": [1, 2], "eval_clips": 4, "resources": {"cpus": 1, "gpus": 0}}
    return raw


def tiny_params(**presto_s) -> Params:
    raw = tiny_raw()
    raw["presto_s"] |= presto_s
    return Params.model_validate(raw)


def test_presto_s_writes_a_generator_and_its_recipe(project: Path):
    tracker = RecordingTracker()
    metrics = stage.run(context(project, "presto_s", tiny_params(), "out", tracker))
    generator, cfg = load_model(project / "out" / MODEL_DIR)
    teacher, teacher_cfg = load_model(project / "artifacts" / "train_dit" / MODEL_DIR)
    assert isinstance(generator, DiT) and cfg == teacher_cfg
    assert any(not torch.equal(a, b) for a, b in zip(generator.state_dict().values(), teacher.state_dict().values()))
    assert json.loads((project / "out" / EDM_FILE).read_text()) == EDM
    recipe = SamplingRecipe.model_validate_json((project / "out" / stage.RECIPE_FILE).read_text())
    assert recipe == tiny_params().presto_s.recipe and recipe.sampler == "consistency"

    assert tracker.tags["p_gen"] == "inf" and tracker.tags["p_dmd"] == "train"
    assert json.loads(tracker.tags["disc_strides"]) == [3, 2, 2, 2]  # 62.5 frames/s -> 2.6 logits/s
    for key in ("loss/dsm", "loss/gan_critic", "grad_norm/dsm", "grad_norm/gan_critic", "loss/dmd",
                "loss/gan_generator", "grad_norm/dmd", "grad_norm/gan_generator", "grad_norm/generator"):
        assert tracker.steps_with(key) == [2, 4], key  # iterations 2 and 4 are generator turns (k = 2)
    for key in ("train_loss_dsm", "train_loss_dmd", "train_grad_norm_gan_generator", "latent_fd_1step",
                "latent_fd_2step", "init_latent_fd_1step", "init_latent_fd_2step"):
        assert math.isfinite(metrics[key]), key
    assert metrics["iterations"] == 4 and metrics["generator_updates"] == 2 and metrics["resumed_from_iteration"] == 0
    assert [p.name for p in (project / "checkpoints" / "presto_s" / "fp").iterdir()] == ["step-00000002"]


def test_a_rerun_after_a_crash_resumes_from_the_checkpoint_exactly(project: Path, monkeypatch):
    params = tiny_params()
    stage.run(context(project, "presto_s", params, "straight", RecordingTracker()))
    (project / "checkpoints").rename(project / "checkpoints-straight")

    step_once = PrestoS.train_step

    def crash_at_iteration_3(self, x, cond):
        if self.iteration == 3:
            raise RuntimeError("worker lost")
        return step_once(self, x, cond)

    monkeypatch.setattr(PrestoS, "train_step", crash_at_iteration_3)
    with pytest.raises(RuntimeError, match="worker lost"):
        stage.run(context(project, "presto_s", params, "crashed", RecordingTracker()))
    monkeypatch.setattr(PrestoS, "train_step", step_once)

    tracker = RecordingTracker()
    metrics = stage.run(context(project, "presto_s", params, "resumed", tracker))
    assert metrics["resumed_from_iteration"] == 2
    assert tracker.steps_with("loss/dsm") == [4]  # iterations 1-2 were not trained again
    straight, _ = load_model(project / "straight" / MODEL_DIR)
    resumed, _ = load_model(project / "resumed" / MODEL_DIR)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_distillation_seed_repeats_the_distillation_on_the_same_scoring_noise(project: Path):
    runs = run_at_seeds(project, stage, "presto_s", lambda seed: tiny_params(seed=seed))
    # the starting generator is scored on the same noise whatever the seed, so scores compare across seeds
    assert runs["other"][0]["init_latent_fd_1step"] == runs["default"][0]["init_latent_fd_1step"]
    assert runs["other"][0]["latent_fd_1step"] != runs["default"][0]["latent_fd_1step"]


def test_a_nan_stops_the_stage_and_keeps_the_last_good_checkpoint(project: Path, monkeypatch):
    exact = presto_s_module.dmd_gradient
    calls = []

    def nan_on_second_generator_turn(x_gen, d_fake, d_real):
        calls.append(1)
        g = exact(x_gen, d_fake, d_real)
        return g * float("nan") if len(calls) == 2 else g

    monkeypatch.setattr(presto_s_module, "dmd_gradient", nan_on_second_generator_turn)
    with pytest.raises(DivergenceError, match=r"generator turn, step 4: loss/dmd = nan.*last good checkpoint"):
        stage.run(context(project, "presto_s", tiny_params(), "out", RecordingTracker()))
    assert latest_state(project / "checkpoints" / "presto_s" / "fp").name == "step-00000002"
    assert not (project / "out" / MODEL_DIR).exists()


def test_every_noise_role_is_chosen_by_name_and_bad_params_are_named():
    raw = tiny_raw()
    raw["presto_s"]["method"] |= {"p_gen": "train", "p_dsm": "mixed"}
    method = parse_params(raw).presto_s.method
    assert (method.p_gen, method.p_dmd, method.p_dsm, method.p_gan) == ("train", "train", "mixed", "train")

    raw["presto_s"]["method"]["p_dmd"] = "uniform"
    with pytest.raises(ParamsError, match=r"presto_s\.method.*p_dmd = 'uniform' is not one of sigmas"):
        parse_params(raw)
    raw = tiny_raw()
    raw["presto_s"]["recipe"]["guidance"] = "cfg"
    with pytest.raises(ParamsError, match="sampler consistency, guidance none"):
        parse_params(raw)
    raw = tiny_raw()
    raw["presto_s"]["method"]["critic_updates_per_generator"] = 0
    with pytest.raises(ParamsError, match="critic_updates_per_generator"):
        parse_params(raw)
