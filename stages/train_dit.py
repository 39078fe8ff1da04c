"""train_dit: the base EDM DiT on encode's latents and caption embeddings, with Ray Train.

The stage body is a driver: it checks the inputs, then runs `train_worker` on `train_dit.workers` Ray
Train workers (TorchTrainer: gloo DDP on CPUs, NCCL on GPUs, one node or many), each holding
`cpus_per_worker` / `gpus_per_worker`. Every worker reads its own share of each epoch (`batch_indices`);
gradients are averaged by DDP.

Resumption. Every `ckpt_every` steps rank 0 saves a training state (weights, EMA, AdamW, step) and reports
it as a Ray Train checkpoint under `ctx.checkpoint_dir/<fingerprint>`. A lost worker restarts the group
from the newest one (`max_failures` times; never for bad data or a diverged loss, which would fail again);
a crashed stage rerun with the same inputs has the same fingerprint, so Ray Train finds the run's
checkpoints and resumes it; changed inputs start fresh. Randomness is a function of the seed, the step and
an item's place in the step's global batch, so a resumed run continues exactly, and `workers` workers of
`batch` clips train as one worker of workers * batch clips would (up to float rounding).

Rank 0 logs loss curves, the validation loss of the EMA weights and, at the end, a few generated clips
with a spectrogram to the tracker. The driver writes `model/` (the EMA DiT via save_model), `edm.json`
(sigma_data, sigma_min, sigma_max) and the metrics.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from presto.config import TrainDiTParams
from presto.data.latents import LatentDataset, LatentStats, check_latents_fit, collate_latents
from presto.diffusion.edm import Denoiser
from presto.errors import InputError, PrestoError
from presto.generation import EDM_FILE, MODEL_DIR
from presto.models.checkpoint import save_model
from presto.models.dit import DiT
from presto.text.condition import TextCondition
from presto.training.dit_trainer import (
    BATCH_ITEM_STREAM,
    DiTTrainer,
    batch_indices,
    random_crops,
    step_generator,
    validation_loss,
)
from presto.training.progress import Progress, check_finite
from presto.training.state import load_state
from stages.base import StageContext

VAE_MODEL = "model"  # train_vae's model folder
SAMPLES_SUBDIR = "samples"


# ---- the worker ---------------------------------------------------------------------------------------


def _batch(dataset: LatentDataset, indices: list[int], frames: int, seed: int, rank: int,
           step: int, world: int = 1) -> tuple[torch.Tensor, TextCondition]:
    """Random crops of the clips at `indices`, each with one random caption, as a padded batch.

    The caption and the crop of item j come from a generator of its own, keyed by the seed, the step and
    j * world + rank (the item's place in the step's global batch, see batch_indices): a resumed run draws
    what the uninterrupted one drew, and `world` workers draw what one worker with the global batch would.
    """
    items, generators = [], []
    for j, i in enumerate(indices):
        gen = step_generator(seed, BATCH_ITEM_STREAM, step, j * world + rank)
        # The dataset draws the caption from torch's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (), generator=gen)))
            items.append(dataset[i])
        generators.append(gen)
    latents = random_crops([z for z, _ in items], frames, generators)
    _, cond = collate_latents([(z, c) for z, (_, c) in zip(latents, items)])
    bad = [dataset.rows[i]["clip_id"] for i, z, (_, c) in zip(indices, latents, items)
           if not (torch.isfinite(z).all() and torch.isfinite(c.tokens).all() and torch.isfinite(c.pooled).all())]
    if bad:
        raise InputError(f"step {step}: the latents or caption embeddings of clip{'s' * (len(bad) > 1)} "
                         f"{', '.join(bad)} hold NaN or Inf; rerun encode (or drop the clip); training "
                         "stopped, the last good checkpoint is kept")
    return latents, cond


def _validation_batches(dataset: LatentDataset | None, clips: int, frames: int,
                        batch: int) -> list[tuple[torch.Tensor, TextCondition]]:
    """The first `clips` validation clips, first caption, first `frames` frames: the same every time."""
    if dataset is None:
        return []
    items = [dataset[i] for i in range(min(clips, len(dataset)))]
    length = min(frames, *(z.shape[-1] for z, _ in items))
    items = [(z[..., :length], c) for z, c in items]
    return [collate_latents(items[i:i + batch]) for i in range(0, len(items), batch)]


def _open_val(folder: Path) -> LatentDataset | None:
    try:
        return LatentDataset(folder, "val", caption="first")
    except InputError:  # a corpus split without validation clips: no validation loss
        return None


def _log_samples(config: dict[str, Any], dit: DiT, params: TrainDiTParams, device: torch.device,
                 step: int) -> dict[str, float]:
    """Generate `samples` clips from validation captions with the EMA weights; log wavs + a spectrogram."""
    import soundfile as sf

    from presto.audio.plots import save_spectrograms
    from presto.generation import Generator

    prompts = config["sample_prompts"][:params.samples]
    generator = Generator.around(dit, params.sigma_data, vae_dir=config["vae_dir"], encode_dir=config["encode_dir"],
                                 device=device)
    audio, timings = generator.generate(prompts, params.sample_seconds, list(range(len(prompts))),
                                        params.sample_recipe)
    rate = generator.sample_rate
    tracker = config["tracker"]
    with tempfile.TemporaryDirectory() as tmp:
        for k, clip in enumerate(audio):
            sf.write(Path(tmp) / f"sample-{k}.wav", clip, rate)
        save_spectrograms([(p[:90], clip) for p, clip in zip(prompts, audio)], rate,
                          Path(tmp) / "spectrograms.png")
        (Path(tmp) / "prompts.txt").write_text("".join(f"sample-{k}: {p}\n" for k, p in enumerate(prompts)))
        tracker.log_artifact(tmp, subdir=f"{SAMPLES_SUBDIR}/step-{step:08d}")
    return {f"sample_{k}": v for k, v in timings.items()}


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train loop of one worker (runs in its own process)."""
    import ray.train
    import ray.train.torch

    params = TrainDiTParams.model_validate(config["params"])
    seed, tracker = config["seed"], config["tracker"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(params.cpus_per_worker)))
    device = ray.train.torch.get_device()

    torch.manual_seed(seed)  # the same initial weights on every worker (DDP also broadcasts rank 0's)
    net = ray.train.torch.prepare_model(DiT(params.model))
    trainer = DiTTrainer(net, params, device=device, seed=seed, rank=rank, world=world)
    start, resumed_from = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start, _ = trainer.load(folder)
        resumed_from = start
        print(f"train_dit: rank {rank} resumes from step {start}", flush=True)
    if rank == 0:  # at once, so that a run stopped later still says where it started
        tracker.log_metrics({"resumed_from_step": resumed_from}, step=start)

    folder = Path(config["encode_dir"])
    train = LatentDataset(folder, "train")
    val = _validation_batches(_open_val(folder), params.val_clips, params.crop_frames, params.batch)

    progress = Progress("train_dit", params.steps, start=start)
    window: list[float] = []
    summary: dict[str, float] = {"resumed_from_step": resumed_from}
    tokens, t0 = 0, time.monotonic()
    for step in range(start, params.steps):
        latents, cond = _batch(train, batch_indices(step, params.batch, len(train), seed, rank, world),
                               params.crop_frames, seed, rank, step, world)
        logs = trainer.train_step(step, latents, cond)
        check_finite(step, "train_dit: ", loss=logs["loss"], grad_norm=logs["grad_norm"])
        window.append(logs["loss"])
        tokens += latents.shape[0] * latents.shape[-1] * world
        done = step + 1
        rate = (done - start) / (time.monotonic() - t0)
        summary |= {"train_loss": float(np.mean(window)), "steps_per_s": rate,
                    "tokens_per_s": tokens / (time.monotonic() - t0)}
        log_now = done % params.log_every == 0 or done == params.steps
        if rank == 0:
            progress.update(done, loss=logs["loss"])
            if log_now:
                tracker.log_metrics({k: summary[k] for k in ("train_loss", "steps_per_s", "tokens_per_s")}
                                    | {"grad_norm": logs["grad_norm"], "lr": logs["lr"]}, step=done)
            if val and (done % params.val_every == 0 or done == params.steps):
                ema = Denoiser(trainer.ema_model(), params.sigma_data)
                scores = validation_loss(ema, val, params.val_sigmas, seed, device)
                tracker.log_metrics(scores, step=done)
                summary |= scores
        if log_now:
            window = []
        if done == params.steps and rank == 0 and params.samples > 0:
            summary |= _log_samples(config, trainer.ema_model(), params, device, done)
        if done % params.ckpt_every == 0 or done == params.steps:
            _report(trainer, done, summary, rank)


def _report(trainer: DiTTrainer, step: int, summary: dict[str, float], rank: int) -> None:
    """A collective: every worker reports; rank 0 attaches the training state as the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            state = trainer.save(tmp, step, {"summary": summary})
            checkpoint = ray.train.Checkpoint.from_directory(str(state))
        ray.train.report({"step": step, **summary}, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:08d}")


# ---- the driver ---------------------------------------------------------------------------------------


def check_inputs(p: TrainDiTParams, encode_dir: Path, vae_dir: Path, samples: int) -> LatentStats:
    """Fail in seconds, before Ray Train starts, when encode's output does not fit the params."""
    stats = check_latents_fit(encode_dir, sigma_data=p.sigma_data, latent_channels=p.model.latent_channels,
                              text_dim=p.model.text_dim, model="train_dit's params (train_dit.sigma_data, .model)",
                              fix="rerun encode or fix the params")
    if samples > 0 and not (vae_dir / "config.json").is_file():
        raise InputError(f"{vae_dir}: the VAE that decodes samples is missing; run train_vae first")
    return stats


def sample_prompts(encode_dir: Path, count: int) -> list[str]:
    """The first caption of the first `count` validation clips (training clips when there are none)."""
    dataset = _open_val(encode_dir) or LatentDataset(encode_dir, "train", caption="first")
    return [row["captions"][0] for row in dataset.rows[:count]]


def _unwrap_failure(err: Exception) -> Exception:
    """A worker's own PrestoError (bad data, divergence) rather than Ray Train's wrapper around it."""
    for failure in getattr(err, "worker_failures", {}).values():
        cause = getattr(failure, "cause", failure)
        if isinstance(cause, PrestoError):
            return cause
    return err


def _fit(make_trainer: Callable[[], Any], max_failures: int) -> Any:
    """trainer.fit(), restarted from the newest checkpoint after up to `max_failures` lost workers.

    Ray Train's own FailureConfig(max_failures) would also retry a worker's PrestoError (NaN loss, bad
    data), which fails the same way every time; so Ray Train gets max_failures=0 and the retries are here.
    A new fit with the same RunConfig(name, storage_path) resumes from the run's newest checkpoint.
    """
    import ray.train

    failures = 0
    while True:
        try:
            return make_trainer().fit()
        except ray.train.WorkerGroupError as err:
            cause = _unwrap_failure(err)
            if cause is not err:
                raise cause from err
            if failures == max_failures:
                raise
            failures += 1
            print(f"train_dit: a worker failed ({err}); restarting from the last checkpoint "
                  f"(retry {failures} of {max_failures})", flush=True)


def run(ctx: StageContext) -> dict[str, float]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from stages.process_group import BoundStoreTorchConfig

    p = ctx.params.train_dit
    encode_dir, vae_dir = ctx.upstream("encode"), ctx.upstream("train_vae") / VAE_MODEL
    check_inputs(p, encode_dir, vae_dir, p.samples)
    ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    config = {"params": p.model_dump(mode="json"), "seed": ctx.params.shared.seed, "tracker": ctx.tracker,
              "encode_dir": str(encode_dir), "vae_dir": str(vae_dir),
              "sample_prompts": sample_prompts(encode_dir, p.samples)}
    resources = {"CPU": p.cpus_per_worker} | ({"GPU": p.gpus_per_worker} if p.use_gpu else {})
    available = ray.cluster_resources() if ray.is_initialized() else {}
    short = {k: p.workers * v for k, v in resources.items() if p.workers * v > available.get(k, 0.0)}
    if available and short:  # an autoscaling cluster may still grow; a fixed one would make Ray Train wait forever
        print(f"train_dit: {p.workers} workers need {short} in all, the Ray cluster has "
              f"{ {k: available.get(k, 0.0) for k in short} } now; training waits until they are there", flush=True)
    result = _fit(lambda: TorchTrainer(
        train_worker,
        train_loop_config=config,
        torch_config=BoundStoreTorchConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=p.workers, use_gpu=p.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=ctx.fingerprint, storage_path=str(ctx.checkpoint_dir),
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Train's print patch copies each worker print to its logger, which Ray forwards too: every
            # progress line came out twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    ), p.max_failures)
    if result.checkpoint is None:
        raise RuntimeError("train_dit: Ray Train finished without a checkpoint")

    ema = DiT(p.model)
    with result.checkpoint.as_directory() as folder:
        step, extra = load_state(folder, {"ema": ema}, {})
    save_model(ema, p.model, ctx.out_dir / MODEL_DIR)
    edm = {"sigma_data": p.sigma_data, "sigma_min": p.sigma_min, "sigma_max": p.sigma_max}
    (ctx.out_dir / EDM_FILE).write_text(json.dumps(edm, indent=2) + "\n")
    metrics = {"steps": float(step), "parameters": float(sum(t.numel() for t in ema.parameters())),
               **{k: float(v) for k, v in extra["summary"].items()}}
    return metrics
