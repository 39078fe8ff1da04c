"""caption: analyse every clip's audio (tempo, key, level, brightness) and write several captions per clip.

Reads augment's manifest (prepare's clips and the augmented ones) and writes `captions.jsonl`, one row per
clip: {clip_id, split, captions, analysis}. The metrics say how often the analysis agrees with the
metadata labels: a check on the analysis, and on labels that augmentation had to keep true.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from threadpoolctl import threadpool_limits

from presto.data.analysis import MIREX_KEY_SCORE, describe, key_relation, tempo_agrees
from presto.data.caption import MAX_CAPTION_CHARS, clean_text, make_captions, metadata_bpm, metadata_key
from presto.data.shards import MANIFEST, ShardReader, read_clip_manifest, write_manifest
from presto.errors import InputError
from stages.base import StageContext, parallel_map

CAPTIONS = "captions.jsonl"
# Clips per parallel task: amortises a task's start-up; results do not depend on it, so it is no param.
CHUNK_CLIPS = 64
SAMPLE_CLIPS = 20  # clips whose captions are shown in the tracker
MAX_REPORTED_DISAGREEMENTS = 200


@dataclass(frozen=True)
class CaptionTask:
    artifacts: str  # the folder manifest shard paths are relative to
    rows: list[dict[str, Any]]
    seed: int
    per_clip: int
    attribute_dropout: float


def caption_chunk(task: CaptionTask) -> list[dict[str, Any]]:
    """Analyse and caption the clips of one task, in order."""
    reader = ShardReader(task.artifacts)
    out = []
    # Tasks already fill every core; BLAS threads inside each one only contend (2-3x slower, measured).
    with threadpool_limits(1):
        for row in task.rows:
            analysis = describe(reader.clip(row), row["sample_rate"])
            captions = make_captions(row, analysis, per_clip=task.per_clip,
                                     attribute_dropout=task.attribute_dropout, seed=task.seed)
            out.append({"clip_id": row["clip_id"], "split": row["split"], "captions": captions,
                        "analysis": analysis})
    return out


def agreement_metrics(rows: Sequence[Mapping[str, Any]],
                      analyses: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """How often the analysis agrees with the metadata, over the clips that carry each label.

    tempo_agreement: estimate within 4 % of the labelled bpm; tempo_agreement_octave: also at half or
    double it. key_agreement: the exact key; key_agreement_relative: the exact key, its relative
    major/minor or the fifth above (MIREX's near misses); key_mirex_score: MIREX's weighted score.
    A rate is left out when no clip carries its label.
    """
    pairs = list(zip(rows, analyses))
    tempo = [(a.get("tempo_bpm"), bpm) for r, a in pairs if (bpm := metadata_bpm(r)) is not None]
    keys = [key_relation(a.get("key"), key) for r, a in pairs if (key := metadata_key(r)) is not None]
    out: dict[str, float] = {"tempo_labelled": len(tempo), "key_labelled": len(keys)}
    if tempo:
        out["tempo_agreement"] = sum(tempo_agrees(e, ref) for e, ref in tempo) / len(tempo)
        out["tempo_agreement_octave"] = sum(tempo_agrees(e, ref, octave=True) for e, ref in tempo) / len(tempo)
    if keys:
        out["key_agreement"] = keys.count("exact") / len(keys)
        out["key_agreement_relative"] = sum(k in ("exact", "relative", "fifth") for k in keys) / len(keys)
        out["key_mirex_score"] = sum(MIREX_KEY_SCORE[k] for k in keys) / len(keys)
    return out


def _disagreements(rows: Sequence[Mapping[str, Any]], analyses: Sequence[Mapping[str, Any]]) -> str:
    lines = ["clip_id\tlabel\tmetadata\testimate"]
    for row, a in zip(rows, analyses):
        bpm, key = metadata_bpm(row), metadata_key(row)
        if bpm is not None and not tempo_agrees(a.get("tempo_bpm"), bpm, octave=True):
            lines.append(f"{row['clip_id']}\ttempo\t{bpm:g}\t{a.get('tempo_bpm')}")
        if key is not None and key_relation(a.get("key"), key) == "other":
            lines.append(f"{row['clip_id']}\tkey\t{key}\t{a.get('key')}")
    shown = lines[: MAX_REPORTED_DISAGREEMENTS + 1]
    if len(lines) > len(shown):
        shown.append(f"... and {len(lines) - len(shown)} more")
    return "\n".join(shown) + "\n"


def run(ctx: StageContext) -> dict[str, float]:
    p = ctx.params.caption
    artifacts = ctx.root / "artifacts"
    manifest = ctx.upstream("augment") / MANIFEST
    rows = read_clip_manifest(manifest, artifacts, ctx.params.shared.sample_rate, "augment")
    if not rows:
        raise InputError(f"{manifest}: no clips to caption")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)

    tasks = [CaptionTask(str(artifacts), rows[i:i + CHUNK_CLIPS], ctx.params.shared.seed, p.per_clip,
                         p.attribute_dropout) for i in range(0, len(rows), CHUNK_CLIPS)]
    out_rows = [r for chunk in parallel_map(caption_chunk, tasks, num_cpus=1, desc="caption: analyse")
                for r in chunk]
    write_manifest(ctx.out_dir / CAPTIONS, out_rows)

    analyses = [r["analysis"] for r in out_rows]
    metrics: dict[str, float] = {
        "clips": len(out_rows),
        "captions": sum(len(r["captions"]) for r in out_rows),
        "captions_from_metadata": sum(1 for r in rows if clean_text(r.get("caption"), MAX_CAPTION_CHARS)),
        **agreement_metrics(rows, analyses),
    }
    ctx.tracker.log_metrics(metrics)
    sample = "\n\n".join(f"{r['clip_id']}\n" + "\n".join(f"  - {c}" for c in r["captions"])
                         for r in out_rows[:SAMPLE_CLIPS])
    ctx.tracker.log_text(sample + "\n", "captions_sample.txt")
    ctx.tracker.log_text(_disagreements(rows, analyses), "label_disagreements.tsv")
    return metrics
