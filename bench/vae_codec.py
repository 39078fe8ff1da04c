"""The trained VAE as a codec: reconstruction quality on the test split beside the resampling codec at the
same data rate, and encode/decode throughput (audio seconds per wall second).

Reads the demo pipeline's outputs (artifacts/train_vae/model, artifacts/augment/manifest.jsonl and its
shards) and the scoring settings of params.yaml (train_vae.stft_fft_sizes, mel_fft_size, n_mels; encode's
chunk_seconds for long audio). Throughput is measured on the CPU with torch's thread count as it is, and on
the GPU when one is present (otherwise the GPU rows say "not measured").

    .venv/bin/python bench/vae_codec.py [--repeats 3] [--long-seconds 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from presto.config import load_params  # noqa: E402
from presto.data.shards import MANIFEST, ShardReader, read_clip_manifest  # noqa: E402
from presto.models.checkpoint import load_model  # noqa: E402
from presto.models.vae import AudioVAE  # noqa: E402
from presto.training.vae_trainer import codec_comparison, latent_values_per_second  # noqa: E402
from stages.train_vae import MODEL, whole_clips  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` runs, after one warm-up run (synchronised on GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def throughput(vae: AudioVAE, clips: torch.Tensor, long_audio: torch.Tensor, chunk_frames: int, sample_rate: int,
               repeats: int, device: str) -> dict[str, float]:
    """Audio seconds per wall second: encode/decode of a batch of clips, and of one long clip in chunks."""
    vae = vae.to(device).eval()
    clips, long_audio = clips.to(device), long_audio.to(device)
    latents = vae.encode(clips)[0]
    long_latents = vae.encode_long(long_audio, chunk_frames)[0]
    batch_seconds = clips.shape[0] * clips.shape[-1] / sample_rate
    long_seconds = long_audio.shape[-1] / sample_rate
    return {
        "encode_batch": batch_seconds / timed(lambda: vae.encode(clips), repeats),
        "decode_batch": batch_seconds / timed(lambda: vae.decode(latents), repeats),
        "encode_long": long_seconds / timed(lambda: vae.encode_long(long_audio, chunk_frames), repeats),
        "decode_long": long_seconds / timed(lambda: vae.decode_long(long_latents, chunk_frames), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-seconds", type=float, default=32.0, help="length of the chunked long-audio case")
    parser.add_argument("--batch", type=int, default=8, help="test clips per throughput batch")
    args = parser.parse_args()

    params = load_params(REPO / "params.yaml")
    p, sr = params.train_vae, params.shared.sample_rate
    vae, _ = load_model(REPO / "artifacts" / "train_vae" / MODEL)
    rows = read_clip_manifest(REPO / "artifacts" / "augment" / MANIFEST, REPO / "artifacts", sr, "augment")
    test = [r for r in rows if r["split"] == "test"]
    audio = whole_clips(ShardReader(REPO / "artifacts"), test, vae.hop_length)

    scores = codec_comparison(vae, audio, sample_rate=sr, batch=p.batch, fft_sizes=p.stft_fft_sizes,
                              mel_fft_size=p.mel_fft_size, n_mels=p.n_mels)
    rate = latent_values_per_second(vae, sr)
    print(f"test split: {len(test)} clips of {audio.shape[-1] / sr:.2f} s at {sr} Hz; latents "
          f"{vae.config.latent_channels} x {sr / vae.hop_length:.2f} frames/s = {rate:.0f} values/s; "
          f"resampling codec at {rate:.0f} Hz")
    print("| codec | stft_distance | mel_l1 | si_sdr_db | chroma_similarity |\n|---|---:|---:|---:|---:|")
    for who, name in (("vae", "VAE (posterior mean)"), ("resample", f"resample to {rate:.0f} Hz and back")):
        print(f"| {name} | {scores[f'{who}_stft_distance']:.3f} | {scores[f'{who}_mel_l1']:.3f} | "
              f"{scores[f'{who}_si_sdr_db']:.2f} | {scores[f'{who}_chroma_similarity']:.3f} |")

    clips = audio[:args.batch]
    repeats = -(-int(args.long_seconds * sr) // audio.shape[-1])
    long_audio = audio[:1].repeat(1, 1, repeats)[..., :int(args.long_seconds * sr)]
    chunk_frames = max(1, round(params.encode.chunk_seconds * sr / vae.hop_length))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"\nthroughput, audio seconds per wall second (median of {args.repeats}); batch = {len(clips)} clips "
          f"of {clips.shape[-1] / sr:.2f} s; long = 1 clip of {args.long_seconds:g} s in chunks of "
          f"{chunk_frames} frames; CPU threads {torch.get_num_threads()}")
    print("| device | encode batch | decode batch | encode long | decode long |\n|---|---:|---:|---:|---:|")
    for device in devices:
        t = throughput(vae, clips, long_audio, chunk_frames, sr, args.repeats, device)
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        print(f"| {name} | {t['encode_batch']:.1f} | {t['decode_batch']:.1f} | {t['encode_long']:.1f} | "
              f"{t['decode_long']:.1f} |")
    if "cuda" not in devices:
        print("| GPU | not measured | not measured | not measured | not measured |")


if __name__ == "__main__":
    main()
