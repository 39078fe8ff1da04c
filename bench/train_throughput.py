"""DiT training throughput: tokens per second, model FLOPs utilisation, and whether the data path keeps up.

One step is what train_dit runs on one worker: its batch loader (stages/train_dit._batch: memory-mapped
latent shards, a random crop and a random caption per clip, padded) then DiTTrainer.train_step (the EDM
loss under bf16 autocast on CUDA, float32 on a CPU; AdamW, gradient clipping, EMA). The data come from
`--data` (an encode stage's out folder whose latents match the arch), or else from a synthetic corpus in the
encode stage's format with the arch's shapes, written to a temporary folder.

    data ms     time in the loader; train_dit loads synchronously, so it adds to every step
    compute ms  time in train_step (which reads the loss back, so it waits for the device)
    tokens/s    batch x latent frames / (data + compute)
    MFU         3 x dit_flops (forward + backward = 3 forwards) x batch / (data + compute) / --peak-tflops

Defaults: the arch's train_dit batch and crop_frames; pass --batch and --frames for small shapes on a CPU.

    .venv/bin/python bench/train_throughput.py --arch demo --steps 20 --threads 2 --peak-tflops 0.1
    .venv/bin/python bench/train_throughput.py --arch paper --device cuda          # H100 bf16 dense: 989 TFLOP/s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.latency import arch_params  # noqa: E402
from presto.config import Params  # noqa: E402
from presto.data.latents import (  # noqa: E402
    LATENT_STATS,
    LatentDataset,
    LatentShardWriter,
    LatentStats,
    save_text_shard,
)
from presto.data.shards import MANIFEST, write_manifest  # noqa: E402
from presto.generation import resolve_device  # noqa: E402
from presto.models.dit import DiT, dit_flops  # noqa: E402
from presto.text.condition import TextCondition  # noqa: E402
from presto.training.dit_trainer import DiTTrainer, batch_indices  # noqa: E402
from stages.train_dit import _batch as train_batch  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
SEED = 0


def write_corpus(folder: Path, params: Params, clips: int, frames: int) -> Path:
    """`clips` random clips of `frames` latent frames with one caption each (5 to 30 tokens), as encode
    writes them (float16 shards, manifest, latent statistics); returns the folder."""
    g = torch.Generator().manual_seed(SEED)
    channels, dim = params.train_dit.model.latent_channels, params.train_dit.model.text_dim
    lengths = torch.randint(5, 31, (clips,), generator=g)
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    tokens = torch.randn(clips, mask.shape[1], dim, generator=g) * mask[..., None]
    pooled = torch.randn(clips, dim, generator=g)
    save_text_shard(folder / "text-00000.safetensors", TextCondition(tokens, mask, pooled))
    rows = []
    with LatentShardWriter(folder, "latents", params.encode.shard_clips) as writer:
        for i in range(clips):
            z = params.train_dit.sigma_data * torch.randn(channels, frames, generator=g)
            shard, index = writer.add(z.to(torch.float16))
            rows.append({"clip_id": f"clip-{i}", "split": "train", "shard": shard, "index": index, "frames": frames,
                         "captions": [f"caption {i}"], "caption_refs": [["text-00000.safetensors", i]]})
    write_manifest(folder / MANIFEST, rows)
    rate, hop = params.shared.sample_rate, math.prod(params.train_vae.model.strides)
    LatentStats(mean=[0.0] * channels, std=[1.0] * channels, sigma_data=params.train_dit.sigma_data,
                hop_length=hop, sample_rate=rate, frames_per_second=rate / hop,
                latent_channels=channels).save(folder / LATENT_STATS)
    return folder


def measure(params: Params, data: Path, device: torch.device, batch: int, frames: int, steps: int, warmup: int,
            peak_tflops: float) -> dict:
    torch.manual_seed(SEED)
    cfg = params.train_dit.model
    trainer = DiTTrainer(DiT(cfg).to(device), params.train_dit, device=device, seed=SEED)
    dataset = LatentDataset(data, "train")
    data_ms, compute_ms, flops = [], [], []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        indices = batch_indices(step, batch, len(dataset), SEED, 0, 1)
        latents, cond = train_batch(dataset, indices, frames, SEED, 0, step)
        t1 = time.perf_counter()
        trainer.train_step(step, latents, cond)
        t2 = time.perf_counter()
        if step >= warmup:
            data_ms.append(1e3 * (t1 - t0))
            compute_ms.append(1e3 * (t2 - t1))
            flops.append(3 * batch * dit_flops(cfg, latents.shape[-1], cond.tokens.shape[1], cfg.depth))
    step_s = (sum(data_ms) + sum(compute_ms)) / 1e3
    achieved_tflops = sum(flops) / step_s / 1e12
    return {"device": f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device),
            "precision": "bf16 autocast" if device.type == "cuda" else "float32", "depth": cfg.depth,
            "width": cfg.width, "batch": batch, "frames": latents.shape[-1], "steps": steps,
            "data_ms": statistics.median(data_ms), "compute_ms": statistics.median(compute_ms),
            "data_share": sum(data_ms) / (sum(data_ms) + sum(compute_ms)),
            "steps_per_s": steps / step_s, "tokens_per_s": steps * batch * latents.shape[-1] / step_s,
            "achieved_tflops": achieved_tflops, "peak_tflops": peak_tflops, "mfu": achieved_tflops / peak_tflops}


def table(rows: list[dict]) -> str:
    lines = ["| arch | device | precision | DiT | batch x frames | data ms | compute ms | data share | steps/s | "
             "tokens/s | TFLOP/s | MFU (peak) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['device']} | {r['precision']} | {r['depth']} x {r['width']} | "
                     f"{r['batch']} x {r['frames']} | {r['data_ms']:.1f} | {r['compute_ms']:.1f} | "
                     f"{100 * r['data_share']:.1f} % | {r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['achieved_tflops']:.3g} | {100 * r['mfu']:.3g} % ({r['peak_tflops']:g}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["demo", "paper"], default="demo")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=None, help="clips per step (default: train_dit.batch)")
    ap.add_argument("--frames", type=int, default=None, help="latent frames per clip (default: train_dit.crop_frames)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                    help="the device's peak for MFU (default: H100 bf16 dense, 989)")
    ap.add_argument("--data", type=Path, default=None, help="an encode out folder (default: a synthetic corpus)")
    ap.add_argument("--clips", type=int, default=64, help="clips of the synthetic corpus")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None, help="also write the row here")
    args = ap.parse_args(argv)
    if min(args.steps, args.clips, args.peak_tflops) <= 0 or args.warmup < 0:
        ap.error("--steps, --clips and --peak-tflops must be positive, --warmup not negative")

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = arch_params(args.arch)
    batch = args.batch or params.train_dit.batch
    frames = args.frames or params.train_dit.crop_frames
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"; load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_corpus(Path(tmp), params, args.clips, frames)
        row = {"arch": args.arch, "data": str(args.data) if args.data else f"synthetic ({args.clips} clips)"}
        row |= measure(params, data, device, batch, frames, args.steps, args.warmup, args.peak_tflops)
    print(json.dumps(row), flush=True)
    print(f"# load average {os.getloadavg()}")
    print(table([row]))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
