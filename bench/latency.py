"""Base-model sampling latency at batch 1: text encoding + sampling + VAE decode, per step count.

Architectures (random weights: latency does not depend on the values):
- demo:  params.yaml's train_dit.model and train_vae.model, `generate.seconds` of audio at shared.sample_rate;
- paper: the same with profiles/paper.yaml applied (28 DiT blocks, 44.1 kHz, 32 s of mono audio).

The sampler and guidance are params.yaml's `generate.recipe` (CFG++: two network evaluations per step),
with the step count varied. Each configuration is run once to warm up, then `--repeats` times; the
median of each component is reported. Where a full run is too slow (the paper architecture on a CPU),
`--measure-steps` runs fewer steps and the sampling time is extrapolated linearly per step (every step
costs the same two network evaluations; the first/last step differ only in a few vector operations) and
the table says so. On CUDA the DiT runs under bf16 autocast, the VAE in float32.

    .venv/bin/python bench/latency.py --arch demo --steps 8 16 32 --repeats 3 [--threads 1]
    .venv/bin/python bench/latency.py --arch paper --steps 8 16 32 --measure-steps 2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from presto.config import Params, load_params, parse_params  # noqa: E402
from presto.data.latents import LatentStats  # noqa: E402
from presto.generation import Generator, SamplingRecipe, resolve_device  # noqa: E402
from presto.models.dit import DiT, dit_flops  # noqa: E402
from presto.models.vae import AudioVAE  # noqa: E402
from presto.text.encoder import load_text_encoder  # noqa: E402

PROMPT = "castle, fantasy, medieval --bpm 100"  # a prompt from the paper's demo page
COMPONENTS = ("text_ms", "sample_ms", "decode_ms", "total_ms")


def merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) else value
    return out


def arch_params(arch: str) -> Params:
    params = load_params(REPO / "params.yaml")
    if arch == "demo":
        return params
    overlay = yaml.safe_load((REPO / "profiles" / f"{arch}.yaml").read_text())
    return parse_params(merge(params.model_dump(mode="json"), overlay), f"params.yaml + profiles/{arch}.yaml")


def build(params: Params, device: torch.device) -> Generator:
    torch.manual_seed(0)
    dit, vae = DiT(params.train_dit.model), AudioVAE(params.train_vae.model)
    channels = params.train_dit.model.latent_channels
    rate = params.shared.sample_rate
    stats = LatentStats(mean=[0.0] * channels, std=[1.0] * channels, sigma_data=params.train_dit.sigma_data,
                        hop_length=vae.hop_length, sample_rate=rate, frames_per_second=rate / vae.hop_length,
                        latent_channels=channels)
    text = load_text_encoder(params.encode.text_encoder, device=str(device))
    return Generator(dit, params.train_dit.sigma_data, vae, stats, text, device)


def measure(gen: Generator, recipe: SamplingRecipe, seconds: float, repeats: int) -> dict[str, float]:
    gen.generate([PROMPT], seconds, [0], recipe)  # warm-up: allocator, kernels, caches
    runs = [gen.generate([PROMPT], seconds, [k], recipe)[1] for k in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in (*COMPONENTS, "nfe")}


def bench(arch: str, steps: list[int], measure_steps: int | None, repeats: int, device: torch.device) -> list[dict]:
    params = arch_params(arch)
    seconds = params.generate.seconds
    gen = build(params, device)
    frames = gen.frames(seconds)
    flops = dit_flops(params.train_dit.model, frames, 16, params.train_dit.model.depth)
    print(f"# {arch}: DiT {params.train_dit.model.depth} blocks x {params.train_dit.model.width}, "
          f"{frames} latent frames ({seconds:g} s at {gen.sample_rate} Hz), "
          f"{sum(p.numel() for p in gen.dit.parameters()) / 1e6:.1f} M DiT parameters, "
          f"{flops / 1e9:.1f} GFLOP per item per forward", flush=True)
    rows, measured = [], {}
    base = params.generate.recipe
    for n in steps:
        run_steps = min(n, measure_steps) if measure_steps else n
        if run_steps not in measured:
            recipe = type(base).model_validate(base.model_dump() | {"steps": run_steps})
            measured[run_steps] = measure(gen, recipe, seconds, repeats)
        m = measured[run_steps]
        per_step = m["sample_ms"] / run_steps
        sample_ms = per_step * n
        where = f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
        row = {"arch": arch, "device": where, "steps": n, "nfe": m["nfe"] / run_steps * n,
               "measured_steps": run_steps, "text_ms": m["text_ms"], "sample_ms": sample_ms,
               "per_step_ms": per_step, "decode_ms": m["decode_ms"],
               "total_ms": m["text_ms"] + sample_ms + m["decode_ms"], "seconds": seconds,
               "rtf": (m["text_ms"] + sample_ms + m["decode_ms"]) / 1e3 / seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| arch | device | steps | NFE | text ms | sampling ms (per step) | decode ms | total ms | RTF | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = "" if r["measured_steps"] == r["steps"] else f"sampling extrapolated from {r['measured_steps']} steps"
        lines.append(f"| {r['arch']} | {r['device']} | {r['steps']} | {r['nfe']:.0f} | {r['text_ms']:.0f} | "
                     f"{r['sample_ms']:.0f} ({r['per_step_ms']:.0f}) | {r['decode_ms']:.0f} | {r['total_ms']:.0f} | "
                     f"{r['rtf']:.3f} | {note} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["demo", "paper"], nargs="+", default=["demo"])
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--measure-steps", type=int, default=None, help="run this many steps and extrapolate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    rows = [row for arch in args.arch for row in bench(arch, args.steps, args.measure_steps, args.repeats, device)]
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
