"""The EDM DiT training step: it learns, drops captions at the asked rate, keeps an EMA, resumes exactly,
and its validation loss is a fixed function of the weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from presto.config import TrainDiTParams, load_params
from presto.diffusion.edm import Denoiser
from presto.models.dit import DiT
from presto.text.condition import TextCondition
from presto.training.dit_trainer import (
    DiTTrainer,
    batch_indices,
    keep_mask,
    random_crops,
    step_generator,
    validation_loss,
    warmup_lr,
)

REPO = Path(__file__).resolve().parents[1]
C, T, D = 4, 16, 8  # latent channels, frames, text_dim
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


def tiny_params(**changes) -> TrainDiTParams:
    base = load_params(REPO / "params.yaml").train_dit.model_dump()
    base["model"] = dict(latent_channels=C, width=32, depth=2, heads=2, mlp_ratio=2.0, text_dim=D,
                         budget_conditioning=False)
    base.update(lr=5e-3, warmup_steps=0, batch=8, ema_decay=0.9)
    return TrainDiTParams.model_validate(base | changes)


def make_trainer(seed: int = 0, **changes) -> DiTTrainer:
    params = tiny_params(**changes)
    torch.manual_seed(seed)
    return DiTTrainer(DiT(params.model), params, device=CPU, seed=seed)


def synthetic_set(n: int = 8) -> tuple[torch.Tensor, TextCondition]:
    """Latents of std ~0.5 with structure a model can learn: a per-channel sinusoid whose phase follows the
    caption's pooled vector."""
    g = torch.Generator().manual_seed(123)
    pooled = torch.randn(n, D, generator=g)
    phase = pooled[:, :1, None]
    t = torch.arange(T, dtype=torch.float32)[None, None, :]
    freqs = torch.arange(1, C + 1, dtype=torch.float32)[None, :, None] * 0.3
    latents = 0.7 * torch.sin(freqs * t + phase)
    tokens = pooled[:, None, :].repeat(1, 3, 1)
    return latents, TextCondition(tokens, torch.ones(n, 3, dtype=torch.bool), pooled)


def val_batches():
    latents, cond = synthetic_set()
    return [(latents[:4], cond.select(torch.arange(4))), (latents[4:], cond.select(torch.arange(4, 8)))]


def test_training_lowers_the_validation_loss():
    trainer = make_trainer()
    latents, cond = synthetic_set()
    sigmas = [0.05, 0.3, 1.0, 3.0]
    before = validation_loss(Denoiser(trainer.dit, 0.5), val_batches(), sigmas, seed=7, device=CPU)["val_loss"]
    losses = [trainer.train_step(step, latents, cond)["loss"] for step in range(120)]
    after = validation_loss(Denoiser(trainer.dit, 0.5), val_batches(), sigmas, seed=7, device=CPU)["val_loss"]
    assert all(np.isfinite(losses))
    assert after < 0.8 * before, (before, after)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_validation_loss_is_deterministic_and_reports_each_level():
    trainer = make_trainer()
    trainer.train_step(0, *synthetic_set())  # non-zero output layer, so the loss depends on the weights
    denoiser = Denoiser(trainer.dit, 0.5)
    first = validation_loss(denoiser, val_batches(), [0.1, 1.0], seed=3, device=CPU)
    torch.randn(100)  # the global RNG plays no part
    again = validation_loss(denoiser, val_batches(), [0.1, 1.0], seed=3, device=CPU)
    assert first == again
    assert set(first) == {"val_loss", "val_loss_sigma_0.1", "val_loss_sigma_1"}
    assert first["val_loss"] == pytest.approx((first["val_loss_sigma_0.1"] + first["val_loss_sigma_1"]) / 2)
    assert validation_loss(denoiser, val_batches(), [0.1, 1.0], seed=4, device=CPU) != first


def test_validation_loss_of_the_untrained_model_is_the_edm_baseline():
    """An untrained DiT outputs F = 0, so D = c_skip x and the EDM-weighted error has expectation
    lambda (c_skip - 1)^2 sd^2 + lambda c_skip^2 sigma^2 = 1 for data of std sd (the unit-variance target)."""
    params = tiny_params()
    denoiser = Denoiser(DiT(params.model), 0.5)
    g = torch.Generator().manual_seed(0)
    latents = 0.5 * torch.randn(64, C, 32, generator=g)
    _, cond = synthetic_set()
    cond = TextCondition(cond.tokens[:1].expand(64, -1, -1), cond.mask[:1].expand(64, -1), cond.pooled[:1].expand(64, -1))
    out = validation_loss(denoiser, [(latents, cond)], [0.1, 1.0, 10.0], seed=0, device=CPU)
    assert out["val_loss"] == pytest.approx(1.0, abs=0.03)


def test_condition_dropout_rate():
    kept = torch.cat([keep_mask(1000, 0.1, step_generator(0, 0, s)) for s in range(20)])
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.01)
    assert keep_mask(50, 0.0, step_generator(1)).all() and not keep_mask(50, 1.0, step_generator(1)).any()
    with pytest.raises(ValueError, match="dropout"):
        keep_mask(4, 1.5, step_generator(1))


def test_dropped_captions_do_not_reach_the_model():
    """With dropout 1 every caption is swapped for the null one: two different caption sets give the same
    loss; with dropout 0 they differ."""
    latents, cond = synthetic_set()
    other = TextCondition(-cond.tokens, cond.mask, -cond.pooled)

    def first_loss(dropout, c):
        trainer = make_trainer(cond_dropout=dropout)
        trainer.train_step(0, latents, cond)  # leave the zero-init, so the output depends on the caption
        return trainer.train_step(1, latents, c)["loss"]

    assert first_loss(1.0, cond) == first_loss(1.0, other)
    assert first_loss(0.0, cond) != first_loss(0.0, other)


def test_ema_follows_the_weights_with_its_decay():
    trainer = make_trainer(ema_decay=0.9)
    latents, cond = synthetic_set()
    start = {k: v.clone() for k, v in trainer.dit.state_dict().items()}
    name = "blocks.0.qkv.weight"
    for step in range(3):
        before_ema = trainer.ema_model().state_dict()[name].clone()
        trainer.train_step(step, latents, cond)
        expected = 0.9 * before_ema + 0.1 * trainer.dit.state_dict()[name]
        torch.testing.assert_close(trainer.ema_model().state_dict()[name], expected)
    assert not torch.equal(trainer.ema_model().state_dict()[name], trainer.dit.state_dict()[name])
    assert not torch.equal(trainer.ema_model().state_dict()[name], start[name])


def test_warmup_lr():
    assert warmup_lr(1e-3, 10, 0) == pytest.approx(1e-4)
    assert warmup_lr(1e-3, 10, 9) == warmup_lr(1e-3, 10, 500) == 1e-3
    assert warmup_lr(1e-3, 0, 0) == 1e-3
    trainer = make_trainer(warmup_steps=4)
    assert trainer.train_step(1, *synthetic_set())["lr"] == pytest.approx(tiny_params().lr / 2)


def test_resumed_training_matches_uninterrupted_training(tmp_path: Path):
    latents, cond = synthetic_set()
    straight = make_trainer()
    for step in range(6):
        straight.train_step(step, latents, cond)

    first = make_trainer()
    for step in range(3):
        first.train_step(step, latents, cond)
    saved = first.save(tmp_path, 3, {"note": "x"})
    resumed = make_trainer(seed=0)
    torch.manual_seed(999)  # a different process state: nothing may depend on it
    step, extra = resumed.load(saved)
    assert (step, extra) == (3, {"note": "x"})
    for s in range(step, 6):
        resumed.train_step(s, latents, cond)
    for key, value in straight.dit.state_dict().items():
        torch.testing.assert_close(resumed.dit.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(resumed.ema_model().state_dict()[key], straight.ema_model().state_dict()[key],
                               rtol=0, atol=0)


def test_step_randomness_depends_on_seed_rank_and_step_only():
    a = torch.randn(5, generator=step_generator(0, 1, 2))
    assert torch.equal(a, torch.randn(5, generator=step_generator(0, 1, 2)))
    for other in [(1, 1, 2), (0, 0, 2), (0, 1, 3)]:
        assert not torch.equal(a, torch.randn(5, generator=step_generator(*other)))


def test_batch_indices_deal_each_epoch_across_workers():
    items, batch, world = 11, 2, 2  # 5 items per worker per epoch; item 11's odd one out sits each epoch out
    per_rank = {r: [i for s in range(5) for i in batch_indices(s, batch, items, 0, r, world)] for r in range(world)}
    first_epoch = [per_rank[r][:5] for r in range(world)]
    assert not set(first_epoch[0]) & set(first_epoch[1])  # the workers share no item within an epoch
    assert len(set(first_epoch[0]) | set(first_epoch[1])) == 10
    assert sorted(per_rank[0][5:10]) != sorted(first_epoch[0])  # the next epoch is a new permutation
    assert batch_indices(3, batch, items, 0, 1, world) == per_rank[1][6:8]  # a pure function of the step
    assert [i for s in range(5) for i in batch_indices(s, batch, items, 1, 1, world)] != per_rank[1]  # seed
    with pytest.raises(ValueError, match="cannot feed"):
        batch_indices(0, 2, 1, 0, 0, 2)


def test_random_crops_are_windows_of_the_shortest_length():
    clips = [torch.arange(40.0).reshape(2, 20), torch.arange(24.0).reshape(2, 12) + 100]
    crops = random_crops(clips, 16, [step_generator(0, k) for k in range(2)])
    assert crops.shape == (2, 2, 12)
    for clip, crop in zip(clips, crops):
        start = int(crop[0, 0] - clip[0, 0])
        torch.testing.assert_close(crop, clip[:, start:start + 12])
    starts = {int(random_crops(clips, 5, [step_generator(s, 0), step_generator(s, 1)])[0, 0, 0]) for s in range(30)}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 15
    # A clip's window comes from its own generator: it does not depend on its batch mates.
    alone = random_crops(clips[1:], 5, [step_generator(3, 1)])
    torch.testing.assert_close(alone[0], random_crops(clips, 5, [step_generator(3, 0), step_generator(3, 1)])[1])
