"""The step loop of the audio GAN trainers (the VAE, the stereo upmixer): resume from the newest checkpoint,
then train to the last step, with loss curves averaged over each logging interval, resumable checkpoints and
a validation hook at fixed intervals. What differs between trainers (the batches, what validation scores)
comes in as callables; where the numbers go is the caller's `log_metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from presto.training.progress import Progress, check_finite
from presto.training.state import latest_state, load_state, save_state


class StepTrainer(Protocol):
    step: int

    def train_step(self, batch: Tensor) -> dict[str, float]: ...

    def modules(self) -> dict[str, object]: ...

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...


@dataclass(frozen=True)
class LoopSchedule:
    """Steps to train to, and every how many steps to log curves, save a resumable state and validate."""

    steps: int
    log_every: int
    ckpt_every: int
    val_every: int


def resume_latest(name: str, trainer: StepTrainer, checkpoint_dir: Path) -> int:
    """Load the newest state in `checkpoint_dir` into the trainer, if there is one; returns its step (0 if not)."""
    state = latest_state(checkpoint_dir)
    if state is not None:
        trainer.step, _ = load_state(state, trainer.modules(), trainer.optimizers())
        print(f"{name}: resuming from {state} (step {trainer.step})", flush=True)
    return trainer.step


def train_to_end(name: str, trainer: StepTrainer, next_batch: Callable[[], Tensor], schedule: LoopSchedule, *,
                 checkpoint_dir: Path, audio_seconds_per_step: float,
                 log_metrics: Callable[[dict[str, float], int], None],
                 validate: Callable[[int], None]) -> float:
    """Train from the trainer's step to `schedule.steps`; returns the wall seconds it took.

    Curves: each loss averaged over the interval since the last log, plus steps and audio seconds per second.
    A non-finite loss stops the run (check_finite) before its step is checkpointed, so the newest state on
    disk is the last good one. `validate(step)` runs every val_every steps except the last (the caller scores
    the final model itself).
    """
    progress = Progress(name, schedule.steps, start=trainer.step)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    interval_start = started = time.perf_counter()
    while trainer.step < schedule.steps:
        logs = trainer.train_step(next_batch())
        step = trainer.step
        check_finite(step, f"{name}: ", **logs)
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        progress.update(step, **logs)
        if step % schedule.log_every == 0 or step == schedule.steps:
            elapsed = time.perf_counter() - interval_start
            n = max(counts.values())
            curves = {k: sums[k] / counts[k] for k in sums}
            curves["steps_per_second"] = n / elapsed
            curves["audio_seconds_per_second"] = n * audio_seconds_per_step / elapsed
            log_metrics(curves, step)
            sums, counts, interval_start = {}, {}, time.perf_counter()
        if step % schedule.ckpt_every == 0 or step == schedule.steps:
            save_state(checkpoint_dir, step, trainer.modules(), trainer.optimizers())
        if step % schedule.val_every == 0 and step < schedule.steps:
            validate(step)
    return time.perf_counter() - started
