"""Generation latency at batch 1 of the four model families, and of the stereo upmixer.

Models (random weights: latency does not depend on the values), each sampled by its params.yaml recipe:
- base:      `generate.recipe` (DPM-Solver++(2M) SDE with CFG++: two network evaluations per step), all blocks;
- presto_s:  `presto_s.recipe` (the consistency sampler, no guidance), all blocks;
- presto_l:  the base recipe at `layer_dropping.recipe.schedule` (Presto-L: fewer blocks at high noise);
- presto_ls: `presto_ls.recipe` at `presto_ls.schedule` (Presto-L's budgets one band later: milder).
All four run one DiT built with budget conditioning (the budget embedding adds one vector per forward);
a BudgetedDenoiser applies the schedule where a model has one.

Architectures: demo = params.yaml's models and `generate.seconds` at shared.sample_rate; science and paper = the
same with profiles/<arch>.yaml applied (science: 6 DiT blocks; paper: 28 blocks x 1024, 32 s of 44.1 kHz mono).

Timing (presto.generation.Generator's own pieces, median of `--repeats` after `--warmup` runs; the models
take turns, one run each per round, so a drifting load on a shared machine slows them alike):
- text: the text encoder on the prompt, with the Generator's prompt cache cleared first; the cached time of
  the same prompt is shown in brackets;
- sampling: per model;
- decode: the VAE decode of the clip's latents, timed once per architecture (it is the same for every model);
- upmixer: the arch's `train_stereo.model` on the clip's mono audio (presto.models.upmixer.upmix).
RTF is compute seconds per audio second (below 1: faster than real time); speed-up is the base total over the
model's. On CUDA the DiT runs under bf16 autocast, the VAE and upmixer in float32; `--compile` compiles the
DiT blocks, the VAE decoder and the upmixer (presto.fast_path), the warm-up run paying for compilation.

Where a full run is too slow (the paper architecture on a CPU), `--measure-steps N` runs each model for
min(N, steps) steps and scales its sampling time by the DiT blocks its full recipe runs over those the short
run ran: a block costs the same at every noise level and budget, and guidance keeps the batch the same
(the input and output layers, 0.03 % of a paper-size forward by dit_flops, ride along with the blocks).

    .venv/bin/python bench/latency.py --arch demo --repeats 3 --threads 1 [--compile]
    .venv/bin/python bench/latency.py --arch paper --measure-steps 1 --warmup 0 --repeats 1 --threads 2
    .venv/bin/python bench/latency.py --arch paper --models --compile     # the upmixer alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from presto.config import Params, load_params, parse_params  # noqa: E402
from presto.data.latents import LatentStats  # noqa: E402
from presto.diffusion.edm import Denoiser  # noqa: E402
from presto.distill.presto_l import BudgetedDenoiser, BudgetSchedule, BudgetScheduleConfig  # noqa: E402
from presto.eval.timing import take_turns  # noqa: E402
from presto.fast_path import compile_for_inference  # noqa: E402
from presto.generation import Generator, SamplingRecipe, resolve_device  # noqa: E402
from presto.models.dit import DiT, dit_flops  # noqa: E402
from presto.models.upmixer import Upmixer, upmix  # noqa: E402
from presto.models.vae import AudioVAE  # noqa: E402
from presto.text.encoder import load_text_encoder  # noqa: E402

PROMPT = "castle, fantasy, medieval --bpm 100"  # a prompt from the paper's demo page
MODELS = ("base", "presto_s", "presto_l", "presto_ls")


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


def build(params: Params, device: torch.device, compile: bool) -> Generator:
    """A Generator of random weights with the arch's shapes; its DiT is budget-conditioned (see the top)."""
    torch.manual_seed(0)
    dit_cfg = params.train_dit.model.model_copy(update={"budget_conditioning": True})
    dit, vae = DiT(dit_cfg), AudioVAE(params.train_vae.model)
    channels, rate = dit_cfg.latent_channels, params.shared.sample_rate
    stats = LatentStats(mean=[0.0] * channels, std=[1.0] * channels, sigma_data=params.train_dit.sigma_data,
                        hop_length=vae.hop_length, sample_rate=rate, frames_per_second=rate / vae.hop_length,
                        latent_channels=channels)
    text = load_text_encoder(params.encode.text_encoder, device=str(device))
    return Generator(dit, params.train_dit.sigma_data, vae, stats, text, device, compile="on" if compile else "off")


def model_setups(params: Params, steps: int | None,
                 few_steps: int | None) -> dict[str, tuple[SamplingRecipe, BudgetScheduleConfig | None]]:
    """Each model's recipe and layer schedule (None: every block), step counts overridden where given."""
    base, s, ls = params.generate.recipe, params.presto_s.recipe, params.presto_ls.recipe
    if steps is not None:
        base = base.model_copy(update={"steps": steps})
    if few_steps is not None:
        s, ls = s.model_copy(update={"steps": few_steps}), ls.model_copy(update={"steps": few_steps})
    return {"base": (base, None), "presto_s": (s, None),
            "presto_l": (base, params.layer_dropping.recipe.schedule), "presto_ls": (ls, params.presto_ls.schedule)}


def blocks_run(denoiser: Denoiser, depth: int, recipe: SamplingRecipe) -> int:
    """DiT blocks one item runs over a recipe: every positive level of its grid once, at its budget."""
    sigmas = recipe.sigmas()
    levels = sigmas[sigmas > 0]
    if isinstance(denoiser, BudgetedDenoiser):
        return int(denoiser.schedule(levels).sum())
    return levels.numel() * depth


def clock(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(milliseconds one call of fn takes, its result), the device's queue drained on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - t0), out


def timed(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
          repeats: int) -> dict[str, tuple[float, float, object]]:
    """Per name: (median milliseconds of the `repeats` calls after `warmup` more, milliseconds of the very first
    call (with --compile: compilation included), the last call's result). The names take turns, so a machine
    whose load drifts (a shared one) slows every name alike."""
    runs = take_turns({name: lambda fn=fn: clock(fn, device) for name, fn in fns.items()}, warmup + repeats)
    return {name: (statistics.median(ms for ms, _ in r[warmup:]), r[0][0], r[-1][1]) for name, r in runs.items()}


def bench_models(arch: str, params: Params, gen: Generator, models: list[str], args: argparse.Namespace,
                 seconds: float) -> list[dict]:
    device = gen.device

    def cold_text():
        gen.text_encoder.clear()
        return gen.encode_text([PROMPT])

    text_ms, _, text = timed({"text": cold_text}, device, args.warmup, args.repeats)["text"]
    cached_ms, _, _ = timed({"cached": lambda: gen.encode_text([PROMPT])}, device, 0, args.repeats)["cached"]

    sigma_data = params.train_dit.sigma_data
    setups = {name: s for name, s in model_setups(params, args.steps, args.few_steps).items() if name in models}
    denoisers, runs = {}, {}
    for name, (recipe, schedule) in setups.items():
        denoisers[name] = (Denoiser(gen.dit, sigma_data) if schedule is None else BudgetedDenoiser(
            gen.dit, sigma_data, BudgetSchedule(schedule, gen.dit.cfg.depth, reroute=True)))
        runs[name] = recipe.model_copy(update={"steps": min(recipe.steps, args.measure_steps or recipe.steps)})

    def sampling(name: str) -> Callable[[], tuple[torch.Tensor, int]]:
        def run() -> tuple[torch.Tensor, int]:
            gen.denoiser = denoisers[name]
            return gen.sample_latents(text, seconds, [0], runs[name])
        return run

    sampled = timed({name: sampling(name) for name in setups}, device, args.warmup, args.repeats)
    z_n = next(iter(sampled.values()))[2][0]
    decode_ms, first_decode_ms, _ = timed({"decode": lambda: gen.decode(z_n, seconds)}, device, args.warmup,
                                          args.repeats)["decode"]
    print(f"# {arch}: decode {decode_ms:.0f} ms, its first call {first_decode_ms:.0f} ms", flush=True)

    rows = []
    for name, (recipe, _) in setups.items():
        sample_ms, first_ms, (_, nfe) = sampled[name]
        depth = gen.dit.cfg.depth
        full_blocks, run_blocks = (blocks_run(denoisers[name], depth, r) for r in (recipe, runs[name]))
        steps, run_steps = recipe.steps, runs[name].steps
        sample_ms *= full_blocks / run_blocks
        total_ms = text_ms + sample_ms + decode_ms
        rows.append({"arch": arch, "device": where(device), "compile": args.compile, "model": name,
                     "sampler": recipe.sampler, "guidance": recipe.guidance, "steps": steps,
                     "measured_steps": run_steps, "nfe": nfe / run_steps * steps,
                     "blocks_per_step": full_blocks / steps,
                     "text_ms": text_ms, "text_cached_ms": cached_ms, "sample_ms": sample_ms,
                     "first_sample_ms": first_ms, "decode_ms": decode_ms, "total_ms": total_ms,
                     "seconds": seconds, "frames": gen.frames(seconds), "rtf": total_ms / 1e3 / seconds})
    base = next((row["total_ms"] for row in rows if row["model"] == "base"), None)
    for row in rows:
        row["speedup"] = base / row["total_ms"] if base else None
        print(json.dumps(row), flush=True)
    return rows


def bench_upmixer(arch: str, params: Params, device: torch.device, args: argparse.Namespace,
                  seconds: float) -> dict:
    torch.manual_seed(0)
    upmixer = Upmixer(params.train_stereo.model).to(device).eval()
    if args.compile:
        compile_for_inference(upmixer)
    rate = params.shared.sample_rate
    mono = np.random.default_rng(0).standard_normal((1, round(seconds * rate))).astype(np.float32) * 0.1
    ms, first_ms, _ = timed({"upmix": lambda: upmix(upmixer, mono)}, device, args.warmup, args.repeats)["upmix"]
    row = {"arch": arch, "device": where(device), "compile": args.compile, "seconds": seconds, "sample_rate": rate,
           "parameters_m": sum(p.numel() for p in upmixer.parameters()) / 1e6, "upmix_ms": ms,
           "first_upmix_ms": first_ms, "rtf": ms / 1e3 / seconds}
    print(json.dumps(row), flush=True)
    return row


def where(device: torch.device) -> str:
    return f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)


def model_table(rows: list[dict]) -> str:
    lines = ["| arch | device | compile | model | sampler, guidance | steps | NFE | blocks/step | text ms (cached) | "
             "sampling ms | decode ms | total ms | RTF | speed-up | note |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = "" if r["measured_steps"] == r["steps"] else f"sampling scaled from {r['measured_steps']} step(s)"
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else ""
        lines.append(f"| {r['arch']} | {r['device']} | {'on' if r['compile'] else 'off'} | {r['model']} | "
                     f"{r['sampler']}, {r['guidance']} | {r['steps']} | {r['nfe']:.0f} | {r['blocks_per_step']:.1f} | "
                     f"{r['text_ms']:.0f} ({r['text_cached_ms']:.2f}) | {r['sample_ms']:.0f} | {r['decode_ms']:.0f} | "
                     f"{r['total_ms']:.0f} | {r['rtf']:.3f} | {speedup} | {note} |")
    return "\n".join(lines)


def upmixer_table(rows: list[dict]) -> str:
    lines = ["| arch | device | compile | audio | upmixer M params | upmix ms | RTF |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['device']} | {'on' if r['compile'] else 'off'} | "
                     f"{r['seconds']:g} s at {r['sample_rate']} Hz | {r['parameters_m']:.2f} | {r['upmix_ms']:.0f} | "
                     f"{r['rtf']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["demo", "science", "paper"], nargs="+", default=["demo"])
    ap.add_argument("--models", choices=MODELS, nargs="*", default=list(MODELS),
                    help="models to time (none: the upmixer alone)")
    ap.add_argument("--steps", type=int, default=None, help="base and presto_l steps (default: generate.recipe)")
    ap.add_argument("--few-steps", type=int, default=None,
                    help="presto_s and presto_ls steps (default: their recipes')")
    ap.add_argument("--seconds", type=float, default=None, help="audio length (default: the arch's generate.seconds)")
    ap.add_argument("--measure-steps", type=int, default=None, help="run at most this many steps and scale up")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks, VAE decoder and upmixer")
    ap.add_argument("--no-upmixer", action="store_true", help="skip the upmixer")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.compile and args.warmup < 1:
        ap.error("--compile needs --warmup >= 1: the first call compiles")

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"; load average {os.getloadavg()}", flush=True)
    model_rows, upmixer_rows = [], []
    for arch in args.arch:
        params = arch_params(arch)
        seconds = args.seconds or params.generate.seconds
        if args.models:
            gen = build(params, device, args.compile)
            cfg, n_params = gen.dit.cfg, sum(p.numel() for p in gen.dit.parameters())
            print(f"# {arch}: DiT {cfg.depth} blocks x {cfg.width}, {gen.frames(seconds)} latent frames "
                  f"({seconds:g} s at {gen.sample_rate} Hz), {n_params / 1e6:.1f} M DiT parameters, "
                  f"{dit_flops(cfg, gen.frames(seconds), 16, cfg.depth) / 1e9:.1f} GFLOP per item per full-depth "
                  "forward (16 text tokens)", flush=True)
            model_rows += bench_models(arch, params, gen, args.models, args, seconds)
            del gen
        if not args.no_upmixer:
            upmixer_rows.append(bench_upmixer(arch, params, device, args, seconds))
    print(f"# load average {os.getloadavg()}")
    if model_rows:
        print(model_table(model_rows))
    if upmixer_rows:
        print(upmixer_table(upmixer_rows))
    if args.json:
        args.json.write_text(json.dumps({"models": model_rows, "upmixer": upmixer_rows}, indent=2))


if __name__ == "__main__":
    main()
