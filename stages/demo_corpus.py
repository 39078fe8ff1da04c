"""Stage demo_corpus: a corpus of real music, rendered from music21's bundled scores with a GM soundfont.

Works are tried in one seeded order and rendered in parallel batches; the corpus is the shortest prefix
of that order whose audio reaches `minutes`, so it does not depend on the batch size or the number of
workers. Each worker writes its own FLAC and returns only its metadata row, so memory holds one piece per
worker whatever the corpus size.

Writes corpus/<work>.flac (44.1 kHz, 16-bit), corpus/metadata.csv (keyed by `path`, what prepare reads)
and skipped.jsonl (every work tried and left out, with the reason).
"""

from __future__ import annotations

import math
from pathlib import Path

from presto.audio.midi_render import default_soundfont, fluidsynth_binary
from presto.data.demo_corpus import (PieceJob, PieceResult, check_params, list_works, render_piece, work_order,
                                     write_metadata, write_skipped)
from presto.errors import ParamsError
from stages.base import StageContext, parallel_map

MIN_BATCH, MAX_BATCH = 8, 256  # works per parallel batch: enough to keep workers busy, few to waste
EXAMPLES = 3  # pieces attached to the tracked run, to listen to


def run(ctx: StageContext) -> dict[str, float]:
    params = ctx.params.demo_corpus
    seed = ctx.params.shared.seed
    fluidsynth_binary()  # fail once here rather than once per piece
    soundfont = ctx.resolve(params.soundfont) if params.soundfont is not None else default_soundfont()
    check_params(params, soundfont)
    works = work_order(list_works(params.sources), seed)
    corpus_dir = ctx.out_dir / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)

    target = params.minutes * 60.0
    kept: list[dict] = []
    skipped: list[PieceResult] = []
    seconds, tried = 0.0, 0
    while seconds < target and tried < len(works):
        # The first batch measures how many seconds a tried work yields (skips included); later ones ask
        # for about what is still missing.
        size = MIN_BATCH if seconds == 0 else math.ceil((target - seconds) / (seconds / tried))
        size = min(MAX_BATCH, max(MIN_BATCH, size))
        jobs = [PieceJob(work, seed, params, str(soundfont), str(corpus_dir)) for work in works[tried:tried + size]]
        for result in parallel_map(render_piece, jobs, num_cpus=1, desc="demo_corpus: rendering"):
            if seconds >= target:  # past the prefix that fills the corpus: drop, whatever it holds
                if result.row is not None:
                    (corpus_dir / result.row["path"]).unlink()
            elif result.row is not None:
                kept.append(result.row)
                seconds += result.row["duration_s"]
            else:
                skipped.append(result)
        tried += len(jobs)
        ctx.tracker.log_metrics({"minutes_rendered": seconds / 60.0, "pieces": len(kept),
                                 "skipped": len(skipped)}, step=tried)
    if seconds < target:
        raise ParamsError(
            f"params.yaml: demo_corpus.minutes = {params.minutes:g}, but demo_corpus.sources {params.sources} "
            f"give only {seconds / 60.0:.1f} minutes ({len(kept)} works rendered, {len(skipped)} skipped); "
            "add sources or lower minutes")

    write_metadata(corpus_dir / "metadata.csv", kept)
    write_skipped(ctx.out_dir / "skipped.jsonl", skipped)
    ctx.tracker.set_tags({"soundfont": Path(soundfont).name})
    ctx.tracker.log_artifact(ctx.out_dir / "skipped.jsonl")
    ctx.tracker.log_artifact(corpus_dir / "metadata.csv")
    for row in kept[:EXAMPLES]:
        ctx.tracker.log_artifact(corpus_dir / row["path"], "examples")
    return {"pieces": float(len(kept)), "skipped": float(len(skipped)), "minutes": seconds / 60.0}
