"""Faults during training, and data parallelism that is real.

- A Ray Train worker SIGKILLed mid-stage: train_dit restarts the worker group from the last checkpoint and
  finishes; the step counter goes on from that checkpoint.
- Two CPU workers (gloo DDP) of batch B end where one worker of batch 2B does.
- NaN/Inf in the inputs or the loss stops training with a message naming the step and the quantity, is not
  retried, and leaves the last good checkpoint in place (no NaN state after it).

The Ray Train runs use test_train_dit_stage's synthetic encode output and tiny DiT.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train_dit_stage import FileTracker, context, local_ray, make_encode_output, tiny_params  # noqa: F401
from test_train_vae import context as vae_context
from test_train_vae import make_augment, tones
from test_train_vae import tiny_params as vae_params
from test_train_vae import trainer as vae_trainer

from presto.data.latents import LatentDataset
from presto.errors import DivergenceError, InputError
from presto.generation import EDM_FILE
from presto.models.checkpoint import load_model
from presto.models.dit import DiT
from presto.training.dit_trainer import batch_indices
from presto.training.state import latest_state, load_state
from stages import train_dit
from stages import train_vae

STEPS = 12  # each checkpoint report costs Ray Train ~0.3-1 s, so a kill after the first lands mid-run
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's reported checkpoints
DDP_ATOL = 2e-6  # 1 vs 2 workers differ by float rounding in the gradient all-reduce: measured 2e-7 at most


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoints Ray Train has registered for the run (what a restart resumes from)."""
    path = run_dir / SNAPSHOT
    if not path.is_file():
        return []
    try:
        snapshot = json.loads(path.read_text())
    except json.JSONDecodeError:  # caught mid-write
        return []
    return [r["metrics"]["step"] for r in snapshot["checkpoint_results"]]


class WorkerKiller(threading.Thread):
    """SIGKILLs this test's Ray Train worker once the run has registered a checkpoint.

    The worker is found among this process's descendants (ray.init started the raylet, whose children
    the workers are), so other Ray clusters on the machine are never touched."""

    def __init__(self, run_dir: Path, timeout: float = 300.0):
        super().__init__(daemon=True)
        self.run_dir, self.deadline = run_dir, time.monotonic() + timeout
        self.killed_pid: int | None = None
        self.checkpoint_step = 0

    def run(self) -> None:
        while self.killed_pid is None and time.monotonic() < self.deadline:
            steps = checkpoint_steps(self.run_dir)
            workers = [p for p in psutil.Process().children(recursive=True) if _is_train_worker(p)]
            if steps and workers:
                self.checkpoint_step = max(steps)
                os.kill(workers[0].pid, signal.SIGKILL)
                self.killed_pid = workers[0].pid
            time.sleep(0.05)


def _is_train_worker(process: psutil.Process) -> bool:
    try:
        return "RayTrainWorker" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def tracked(tracker: FileTracker, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r["metrics"][key]) for r in tracker.records() if key in r.get("metrics", {})]


# ---- a lost worker, and two workers against one --------------------------------------------------------

@pytest.fixture(scope="module")
def one_worker_killed(tmp_path_factory, local_ray):
    """One worker of batch 8, SIGKILLed after the first checkpoint; max_failures = 1 lets it come back."""
    root = tmp_path_factory.mktemp("killed")
    make_encode_output(root / "artifacts")
    tracker = FileTracker(root / "tracker.jsonl")
    ctx = context(root, tiny_params(steps=STEPS, batch=8, samples=0, val_every=STEPS, max_failures=1), "out",
                  tracker)
    killer = WorkerKiller(ctx.checkpoint_dir / ctx.fingerprint)
    killer.start()
    metrics = train_dit.run(ctx)
    killer.join(timeout=1)
    return ctx, metrics, killer, tracker


@pytest.mark.integration
def test_a_killed_worker_restarts_from_the_last_checkpoint(one_worker_killed):
    ctx, metrics, killer, tracker = one_worker_killed
    assert killer.killed_pid is not None, "the worker was never killed"
    # The second worker group started from a checkpoint no older than the one there at the kill, not step 0.
    starts = [value for _, value in tracked(tracker, "resumed_from_step")]
    assert starts[0] == 0 and len(starts) == 2, starts
    assert killer.checkpoint_step <= starts[1] < STEPS
    assert metrics["resumed_from_step"] == starts[1] and metrics["steps"] == STEPS
    assert math.isfinite(metrics["val_loss"])
    model, _ = load_model(ctx.out_dir / "model")
    assert isinstance(model, DiT)


@pytest.mark.integration
def test_two_workers_train_as_one_worker_with_the_global_batch(one_worker_killed, tmp_path):
    """gloo DDP over 2 CPU workers of batch 4 against the 1-worker run of batch 8 above (which also went
    through a kill and a restart, so this checks exact resumption too): same data, same noise, gradients
    averaged over the global batch, so the same weights up to float rounding."""
    one_ctx, one, _, _ = one_worker_killed
    make_encode_output(tmp_path / "artifacts")
    params = tiny_params(steps=STEPS, batch=4, workers=2, samples=0, val_every=STEPS)
    two = train_dit.run(context(tmp_path, params, "out", FileTracker(tmp_path / "t.jsonl")))
    assert two["steps"] == STEPS and two["resumed_from_step"] == 0
    a, _ = load_model(one_ctx.out_dir / "model")
    b, _ = load_model(tmp_path / "out" / "model")
    torch.manual_seed(params.shared.seed)
    initial = DiT(params.train_dit.model).state_dict()  # what every worker starts from
    moved = max(float((x - initial[name]).abs().max()) for name, x in a.state_dict().items())
    assert moved > 100 * DDP_ATOL, "the tolerance is small beside what training changed"
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=DDP_ATOL, msg=name)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)


@pytest.mark.integration
def test_more_steps_continue_the_finished_run_from_its_last_checkpoint(one_worker_killed):
    """The same inputs with a larger `steps` (the fingerprint leaves steps out): Ray Train finds the run above
    and trains on from its last checkpoint instead of starting over; its samples come from the final step."""
    ctx, _, _, tracker = one_worker_killed
    logged_before = len(tracked(tracker, "train_loss"))
    params = tiny_params(steps=STEPS + 2, batch=8, samples=1, val_every=STEPS, max_failures=1)
    more = train_dit.run(context(ctx.root, params, "out-more", tracker))
    assert more["resumed_from_step"] == STEPS and more["steps"] == STEPS + 2
    assert math.isfinite(more["train_loss"]) and math.isfinite(more["val_loss"])
    logged = [step for step, _ in tracked(tracker, "train_loss")]
    assert set(logged[:logged_before]) == set(range(2, STEPS + 1, 2)), "every log_every step of the run above"
    assert logged[logged_before:] == [STEPS + 2], "no step again"
    samples = [r for r in tracker.records() if "artifact" in r]
    assert samples[-1]["artifact"] == f"samples/step-{STEPS + 2:08d}"
    assert {"sample-0.wav", "spectrograms.png", "prompts.txt"} <= set(samples[-1]["files"])
    assert more["sample_nfe"] == 2 * 3  # CFG++: two evaluations per step, 3 steps
    assert json.loads((ctx.root / "out-more" / EDM_FILE).read_text()) == {"sigma_data": 0.5, "sigma_min": 0.002,
                                                                          "sigma_max": 80.0}
    before, _ = load_model(ctx.out_dir / "model")
    after, cfg = load_model(ctx.root / "out-more" / "model")
    assert isinstance(after, DiT) and cfg.width == 32
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_workers_read_the_one_worker_batch_between_them(tmp_path):
    """What train_dit's workers feed the DiT at a step: 2 workers' batches interleave into 1 worker's."""
    make_encode_output(tmp_path / "artifacts")
    data = LatentDataset(tmp_path / "artifacts" / "encode", "train")
    for step in (0, 3, 7):  # 7 crosses into the third epoch of 20 clips
        one, cond = train_dit._batch(data, batch_indices(step, 8, len(data), 5, 0, 1), 16, 5, 0, step)
        shares = [train_dit._batch(data, batch_indices(step, 4, len(data), 5, r, 2), 16, 5, r, step, 2)
                  for r in range(2)]
        torch.testing.assert_close(torch.stack([s[0] for s in shares], 1).flatten(0, 1), one, rtol=0, atol=0)
        pooled = torch.stack([s[1].pooled for s in shares], 1).flatten(0, 1)
        torch.testing.assert_close(pooled, cond.pooled, rtol=0, atol=0)


# ---- NaN / Inf -----------------------------------------------------------------------------------------

def poison_clip(encode: Path, clip: dict) -> None:
    """Write NaN over one clip's latents in its shard."""
    path = encode / clip["shard"]
    tensors = load_file(str(path))
    tensors["latents"][clip["index"]] = float("nan")
    save_file(tensors, str(path))


@pytest.mark.integration
def test_nan_latents_stop_train_dit_and_keep_the_last_good_checkpoint(tmp_path, local_ray):
    make_encode_output(tmp_path / "artifacts")
    encode = tmp_path / "artifacts" / "encode"
    params = tiny_params(steps=8, samples=0, max_failures=2)
    data = LatentDataset(encode, "train")
    p = params.train_dit
    # A clip first read at step 2 (each clip comes once per epoch), after the checkpoint of step 2 is saved.
    clip = data.rows[batch_indices(2, p.batch, len(data), params.shared.seed, 0, 1)[0]]
    poison_clip(encode, clip)
    tracker = FileTracker(tmp_path / "tracker.jsonl")
    ctx = context(tmp_path, params, "out", tracker)

    with pytest.raises(InputError, match=rf"step 2: the latents .* of clip {clip['clip_id']} hold NaN or Inf"):
        train_dit.run(ctx)
    assert [v for _, v in tracked(tracker, "resumed_from_step")] == [0], "bad data is not retried"
    run_dir = ctx.checkpoint_dir / ctx.fingerprint
    assert checkpoint_steps(run_dir) == [2]
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-00000002"], "no state after the NaN"
    ema = DiT(p.model)
    step, _ = load_state(run_dir / "step-00000002", {"ema": ema}, {})
    assert step == 2 and all(torch.isfinite(t).all() for t in ema.state_dict().values())


def test_nan_audio_is_refused_before_it_reaches_the_vae():
    t = vae_trainer()
    audio = tones(2, 1024)
    t.train_step(audio)
    before = {k: v.clone() for k, v in t.vae.state_dict().items()}
    audio[1, 0, 100] = float("inf")
    with pytest.raises(InputError, match=r"step 2: the input audio batch holds NaN or Inf \(1 of 2048 samples\)"):
        t.train_step(audio)
    assert t.step == 1
    for k, v in t.vae.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_diverged_vae_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    make_augment(tmp_path)
    train_vae.run(vae_context(tmp_path, vae_params(steps=2, examples=0)))  # leaves the state of step 2
    # The same run carried on (same checkpoint folder) with a loss weight that overflows float32: the loss of
    # the first step after the state is Inf.
    with pytest.raises(DivergenceError, match=r"train_vae: step 3: .*loss_g = inf"):
        train_vae.run(vae_context(tmp_path, vae_params(steps=6, examples=0, stft_weight=1e39)))
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000002"], "no state after the Inf"
    t = vae_trainer()
    step, _ = load_state(latest_state(ckpt), t.modules(), t.optimizers())
    assert step == 2 and all(torch.isfinite(v).all() for v in t.vae.state_dict().values())
