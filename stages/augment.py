"""augment: pitch-shifted and time-stretched copies of prepare's training clips, with true labels.

The manifest written here lists every clip downstream stages use: prepare's rows unchanged (their shards
stay in prepare/) followed by one row per augmented clip (shards in augment/).
"""

from __future__ import annotations

import time

from presto.data.augment import AugmentTask, augment_chunk, following_clips
from presto.data.shards import MANIFEST, ShardWriter, read_manifest, to_float, write_manifest
from presto.errors import InputError
from stages.base import StageContext, parallel_map

# Chunks are processed in waves so that the augmented audio held here before it is written stays
# around this size, whatever the corpus size.
WAVE_BYTES = 1 << 30


def run(ctx: StageContext) -> dict[str, float]:
    a = ctx.params.augment
    sample_rate = ctx.params.shared.sample_rate
    manifest = ctx.upstream("prepare") / MANIFEST
    if not manifest.is_file():
        raise InputError(f"{manifest}: prepare's manifest not found; run the prepare stage first")
    rows = read_manifest(manifest)
    stale = {r["sample_rate"] for r in rows} - {sample_rate}
    if stale:
        raise InputError(f"{manifest}: clips at {sorted(stale)} Hz but shared.sample_rate = {sample_rate}; "
                         "rerun prepare")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)

    train = [r for r in rows if r["split"] == "train"]
    followers = following_clips(rows)
    pitches = tuple(int(k) for k in a.pitch_semitones)
    rates = tuple(a.stretch_rates)
    per_clip = len(pitches) + len(rates)
    artifacts = str(ctx.upstream("prepare").parent)  # manifest shard paths are relative to it
    tasks = [
        AugmentTask(artifacts, [(r, followers.get(r["clip_id"])) for r in train[i:i + a.chunk_clips]],
                    pitches, rates)
        for i in range(0, len(train), a.chunk_clips)
    ]
    clip_bytes = 2 * max((round(r["seconds"] * sample_rate) for r in train), default=1)  # int16
    wave = max(1, WAVE_BYTES // (a.chunk_clips * max(per_clip, 1) * clip_bytes))

    out_rows = []
    audio_seconds = cpu = 0.0
    start = time.perf_counter()
    # One task's output fills one shard (all but the last task have chunk_clips clips).
    with ShardWriter(ctx.out_dir, "aug", a.chunk_clips * max(per_clip, 1)) as writer:
        for step, first in enumerate(range(0, len(tasks), wave)):
            for result in parallel_map(augment_chunk, tasks[first:first + wave], num_cpus=1,
                                       desc="augment: sox"):
                for row, clip in zip(result.rows, result.audio):
                    shard, index = writer.add(to_float(clip))
                    out_rows.append({**row, "shard": f"{ctx.name}/{shard}", "index": index})
                audio_seconds += result.audio_seconds
                cpu += result.cpu_seconds
            ctx.tracker.log_metrics({"clips_out": len(out_rows), "audio_seconds": audio_seconds}, step=step)
    wall = time.perf_counter() - start

    write_manifest(ctx.out_dir / MANIFEST, rows + out_rows)
    return {
        "clips_in": len(train),
        "clips_out": len(out_rows),
        "clips_total": len(rows) + len(out_rows),
        "audio_seconds": audio_seconds,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "throughput": audio_seconds / cpu if cpu > 0 else 0.0,
    }
