"""The DAG, declared once. `presto dag` writes dvc.yaml from these specs, and a test checks it is current.

Importing this module is cheap (no torch): the CLI reads it for every command.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageSpec:
    name: str
    help: str
    params: tuple[str, ...]  # params.yaml keys the stage reads (sections or dotted keys)
    code: tuple[str, ...]  # source files/folders whose change makes the stage stale
    upstream: tuple[str, ...] = ()  # stages whose out folder this one reads
    extra_deps: tuple[str, ...] = ()  # other inputs (may use ${...} params templating)
    plots: tuple[str, ...] = ()  # files inside the out folder declared as DVC plots
    resources_key: str | None = None  # params section whose `.resources` Ray reserves

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    @property
    def out(self) -> str:
        return f"artifacts/{self.name}"

    @property
    def metrics(self) -> str:
        return f"{self.out}/metrics.json"


# Plumbing every stage shares (params validation, the runner) does not change what a stage computes, so it
# is not a dependency: editing it must not rebuild the whole pipeline.
SHARED_CODE: tuple[str, ...] = ()

STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        name="demo_corpus",
        help="Render a demo corpus from music21's bundled scores with a General MIDI soundfont.",
        params=("shared.seed", "demo_corpus"),
        code=("stages/demo_corpus.py", "presto/data/demo_corpus.py", "presto/data/music.py",
              "presto/audio/midi_render.py", "presto/audio/io.py"),
        resources_key="demo_corpus",
    ),
    StageSpec(
        name="prepare",
        help="Decode the corpus, cut clips, normalise loudness, split by track, reject bad files.",
        params=("shared.seed", "shared.sample_rate", "shared.clip_seconds", "prepare"),
        code=("stages/prepare.py", "presto/data/prepare.py", "presto/data/shards.py", "presto/data/music.py",
              "presto/audio/io.py"),
        extra_deps=("${prepare.corpus_dir}",),
        resources_key="prepare",
    ),
    StageSpec(
        name="augment",
        help="Pitch-shift and time-stretch training clips with sox; transpose keys and scale tempi.",
        params=("shared.seed", "shared.sample_rate", "augment"),
        code=("stages/augment.py", "presto/data/augment.py", "presto/data/shards.py", "presto/data/music.py"),
        upstream=("prepare",),
        resources_key="augment",
    ),
    StageSpec(
        name="caption",
        help="Write several synthetic captions per clip from metadata and audio analysis (tempo, key, ...).",
        params=("shared.seed", "shared.sample_rate", "caption"),
        code=("stages/caption.py", "presto/data/caption.py", "presto/data/analysis.py", "presto/data/shards.py",
              "presto/data/music.py"),
        upstream=("prepare", "augment"),
        resources_key="caption",
    ),
)

BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}


def get(name: str) -> StageSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are: {', '.join(BY_NAME)}") from None
