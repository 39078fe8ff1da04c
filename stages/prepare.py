"""prepare: the corpus folder -> mono clips in shards, a manifest split by recording, a rejects report."""

from __future__ import annotations

from typing import Any

from presto.data.prepare import (
    DecodedFile,
    DecodeJob,
    DecodeSettings,
    Reject,
    assign_splits,
    decode_file,
    format_rejects,
    group_duplicates,
    inspect_file,
    read_metadata,
    scan_corpus,
    track_id,
)
from presto.data.shards import MANIFEST, ShardWriter, to_float, write_manifest
from presto.errors import InputError
from stages.base import StageContext, parallel_map

# Files are decoded in waves of about this much audio: clips come back to this process before they
# are written, so a wave bounds its memory (2 h of 44.1 kHz mono int16 is 0.6 GB) whatever the corpus size.
WAVE_AUDIO_SECONDS = 2 * 3600.0
SPLITS = ("train", "val", "test")


def _waves(jobs: list[tuple[DecodeJob, float]]) -> list[list[DecodeJob]]:
    waves: list[list[DecodeJob]] = [[]]
    seconds = 0.0
    for job, s in jobs:
        if waves[-1] and seconds + s > WAVE_AUDIO_SECONDS:
            waves.append([])
            seconds = 0.0
        waves[-1].append(job)
        seconds += s
    return [w for w in waves if w]


def _clip_rows(result: DecodedFile, settings: DecodeSettings, stage: str, mono: ShardWriter,
               stereo: ShardWriter) -> list[dict[str, Any]]:
    rows = []
    tid = track_id(result.relpath)
    sr = settings.sample_rate
    assert result.mono is not None
    for k, (start, content, gain_db) in enumerate(zip(result.starts, result.contents, result.gains_db)):
        shard, index = mono.add(to_float(result.mono[k]))
        row: dict[str, Any] = {
            "clip_id": f"{tid}-{k:05d}", "track_id": tid, "path": result.relpath,
            "shard": f"{stage}/{shard}", "index": index, "start_s": round(start / sr, 6),
            "seconds": round(content / sr, 6), "sample_rate": sr, "track_seconds": round(result.seconds, 6),
            "gain_db": gain_db, "source_sample_rate": result.source_sample_rate,
            "source_channels": result.source_channels,
        }
        if result.stereo is not None:
            sshard, sindex = stereo.add(to_float(result.stereo[k]))
            row["stereo_shard"], row["stereo_index"] = f"{stage}/{sshard}", sindex
        rows.append(row)
    return rows


def run(ctx: StageContext) -> dict[str, float]:
    p = ctx.params.prepare
    settings = DecodeSettings.from_params(ctx.params)
    corpus = ctx.resolve(p.corpus_dir)
    if not corpus.is_dir():
        raise InputError(f"prepare.corpus_dir = {p.corpus_dir!r}: folder not found ({corpus})")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)

    scan = scan_corpus(corpus, p.metadata)
    rejects: list[Reject] = list(scan.rejects)
    metadata: dict[str, dict[str, Any]] = {}
    if p.metadata is not None:
        metadata, meta_rejects = read_metadata(corpus, p.metadata, scan.audio)
        rejects += meta_rejects

    # Headers first (cheap): bad files are rejected before any decoding, and durations plan the waves.
    jobs: list[tuple[DecodeJob, float]] = []
    for rel in scan.audio:
        path = str(corpus / rel)
        try:
            info = inspect_file(path, settings)
        except InputError as err:
            rejects.append(Reject("file", rel, str(err).removeprefix(f"{path}: ")))
            continue
        jobs.append((DecodeJob(path, rel, settings), info.seconds))

    rows: list[dict[str, Any]] = []
    fingerprints = {}
    file_seconds = {}
    silent_clips = 0
    done = 0
    with ShardWriter(ctx.out_dir, "mono", p.shard_clips) as mono, \
            ShardWriter(ctx.out_dir, "stereo", p.shard_clips) as stereo:
        for step, wave in enumerate(_waves(jobs)):
            for result in parallel_map(decode_file, wave, num_cpus=1, desc="prepare: decode"):
                if result.reason is not None:
                    rejects.append(Reject("file", result.relpath, result.reason))
                    continue
                fingerprints[result.relpath] = result.fingerprint
                file_seconds[result.relpath] = result.seconds
                silent_clips += result.silent_clips
                rows += [{**metadata.get(result.relpath, {}), **row}
                         for row in _clip_rows(result, settings, ctx.name, mono, stereo)]
            done += len(wave)
            ctx.tracker.log_metrics({"files_decoded": done, "clips": len(rows)}, step=step)

    rejects_path, text_path = ctx.out_dir / "rejects.jsonl", ctx.out_dir / "rejects.txt"
    write_manifest(rejects_path, (r.to_dict() for r in rejects))
    text_path.write_text(format_rejects(rejects), encoding="utf-8")
    ctx.tracker.log_artifact(text_path)
    ctx.tracker.log_artifact(rejects_path)
    if not rows:
        raise InputError(f"prepare.corpus_dir = {p.corpus_dir!r}: no usable audio; "
                         f"rejects: {format_rejects(rejects)[:2000]}")

    # Split by recording: copies of one recording share a group, and a group shares a split.
    group_of = group_duplicates(fingerprints, file_seconds, p.duplicate_tolerance_db)
    group_seconds: dict[str, float] = {}
    for row in rows:
        group = group_of[row["path"]]
        group_seconds[group] = group_seconds.get(group, 0.0) + row["seconds"]
    split_of = assign_splits(group_seconds, p.val_fraction, p.test_fraction, ctx.params.shared.seed)
    for row in rows:
        group = group_of[row["path"]]
        row["split"] = split_of[group]
        if group != row["path"]:
            row["duplicate_of"] = group
    write_manifest(ctx.out_dir / MANIFEST, rows)

    files_rejected = sum(r.kind == "file" for r in rejects)
    metrics: dict[str, float] = {
        "files_total": len(fingerprints) + files_rejected,
        "files_ok": len(fingerprints),
        "files_rejected": files_rejected,
        "files_ignored": sum(r.kind == "ignored" for r in rejects),
        "files_duplicate": sum(group_of[f] != f for f in group_of),
        "metadata_rows_rejected": sum(r.kind == "row" for r in rejects),
        "metadata_values_rejected": sum(r.kind == "value" for r in rejects),
        "metadata_columns_rejected": sum(r.kind == "column" for r in rejects),
        "clips_silent": silent_clips,
        "hours": sum(r["seconds"] for r in rows) / 3600.0,
    }
    for split in SPLITS:
        in_split = [r for r in rows if r["split"] == split]
        metrics[f"clips_{split}"] = len(in_split)
        metrics[f"tracks_{split}"] = len({r["track_id"] for r in in_split})
        metrics[f"hours_{split}"] = sum(r["seconds"] for r in in_split) / 3600.0
    return metrics
