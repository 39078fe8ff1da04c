"""Augment throughput (audio seconds per CPU second) and its speed-up from 1 to 2 Ray workers.

Builds a synthetic prepare output (melodies of harmonic notes, the demo profile's sample rate and clip
length from params.yaml) in a temporary folder, then runs the augment stage body in-process and on a
local Ray with 1 and 2 CPUs. CPU seconds include the sox subprocesses (getrusage of the children).

    RAY_USAGE_STATS_ENABLED=0 .venv/bin/python bench/augment_throughput.py [--clips 64 --chunk-clips 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from presto.config import parse_params  # noqa: E402
from presto.data.shards import ShardWriter, write_manifest  # noqa: E402
from stages import augment as augment_stage  # noqa: E402
from stages.base import StageContext  # noqa: E402


class NullTracker:
    def log_metrics(self, metrics, step=None):
        pass

    def log_artifact(self, path, subdir=None):
        pass

    def log_text(self, text, name):
        pass

    def set_tags(self, tags):
        pass


def melody(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n, np.float32)
    pos = 0
    while pos < n:
        length = int(sr * 0.25 * rng.integers(1, 4))
        f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
        t = np.arange(min(length, n - pos)) / sr
        out[pos:pos + len(t)] = sum(0.6 ** h * np.sin(2 * np.pi * f0 * (h + 1) * t) for h in range(4)) * 0.2
        pos += length
    return out


def fake_prepare(root: Path, clips: int, clips_per_track: int, sr: int, clip_seconds: float) -> None:
    rng = np.random.default_rng(0)
    n = int(sr * clip_seconds)
    rows = []
    with ShardWriter(root / "artifacts" / "prepare", "mono", 256) as writer:
        for i in range(clips):
            track, k = divmod(i, clips_per_track)
            shard, index = writer.add(melody(rng, n, sr))
            rows.append({"clip_id": f"t{track}-{k}", "track_id": f"t{track}", "path": f"t{track}.wav",
                         "split": "train", "shard": f"prepare/{shard}", "index": index, "start_s": k * clip_seconds,
                         "seconds": clip_seconds, "sample_rate": sr, "gain_db": 0.0, "key": "C major", "bpm": 100.0})
    write_manifest(root / "artifacts" / "prepare" / "manifest.jsonl", rows)


def _warm(_: int) -> int:
    """Import the augment code in a worker and hold it briefly, so that every worker gets one."""
    import presto.data.augment  # noqa: F401

    time.sleep(0.5)
    return os.getpid()


def run_once(root: Path, params, label: str) -> dict[str, float]:
    out = root / "artifacts" / "augment"
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    ctx = StageContext(name="augment", params=params, root=root, out_dir=out, checkpoint_dir=root / "ckpt",
                       fingerprint=label, tracker=NullTracker())
    start = time.perf_counter()
    metrics = augment_stage.run(ctx)
    metrics["wall_seconds"] = time.perf_counter() - start
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=64, help="training clips to augment")
    ap.add_argument("--chunk-clips", type=int, default=8, help="clips per Ray task (augment.chunk_clips)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["augment"]["chunk_clips"] = args.chunk_clips
    params = parse_params(raw)
    sr, clip_seconds = params.shared.sample_rate, params.shared.clip_seconds
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fake_prepare(root, args.clips, 8, sr, clip_seconds)
        results.append(("in-process", run_once(root, params, "inproc")))
        for n in args.workers:
            ray.init(num_cpus=n, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
            ray.get([ray.remote(num_cpus=1)(_warm).remote(i) for i in range(n)])
            results.append((f"ray x{n}", run_once(root, params, f"ray{n}")))
            ray.shutdown()

    augs = len(params.augment.pitch_semitones) + len(params.augment.stretch_rates)
    print(f"augment: {args.clips} clips of {clip_seconds:g} s at {sr} Hz, {augs} augmentations each, "
          f"{args.chunk_clips} clips per task; load average {os.getloadavg()[0]:.2f}")
    print(f"{'run':<11} {'clips_out':>9} {'audio_s':>8} {'wall_s':>7} {'cpu_s':>7} {'audio_s/cpu_s':>13} "
          f"{'audio_s/wall_s':>14} {'speed-up':>8}")
    base = next(m["wall_seconds"] for name, m in results if name == "ray x1") if 1 in args.workers else None
    for name, m in results:
        speedup = f"{base / m['wall_seconds']:.2f}x" if base and name.startswith("ray") else ""
        print(f"{name:<11} {m['clips_out']:>9.0f} {m['audio_seconds']:>8.0f} {m['wall_seconds']:>7.2f} "
              f"{m['cpu_seconds']:>7.2f} {m['throughput']:>13.1f} {m['audio_seconds'] / m['wall_seconds']:>14.1f} "
              f"{speedup:>8}")


if __name__ == "__main__":
    main()
