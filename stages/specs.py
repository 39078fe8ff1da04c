"""The DAG, declared once. `presto dag` writes dvc.yaml from these specs, and a test checks it is current.

Importing this module is cheap (no torch): the CLI reads it for every command.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plot:
    """A DVC plot: `file` (inside the stage's out folder) is a JSON list of flat records."""

    file: str
    x: str
    y: str
    title: str


@dataclass(frozen=True)
class StageSpec:
    name: str
    help: str
    params: tuple[str, ...]  # params.yaml keys the stage reads (sections or dotted keys)
    code: tuple[str, ...]  # source files/folders whose change makes the stage stale
    upstream: tuple[str, ...] = ()  # stages whose out folder this one reads
    extra_deps: tuple[str, ...] = ()  # other inputs (may use ${...} params templating)
    plots: tuple[Plot, ...] = ()  # DVC plots written into the out folder
    extra_metrics: tuple[str, ...] = ()  # DVC metrics files in the out folder beside metrics.json
    resources_key: str | None = None  # params section whose `.resources` Ray reserves; None: a driver, 0 CPUs
    module_name: str | None = None  # stages/<module_name>.py runs it when one module serves several stages

    @property
    def module(self) -> str:
        return f"stages.{self.module_name or self.name}"

    @property
    def out(self) -> str:
        return f"artifacts/{self.name}"

    @property
    def metrics(self) -> str:
        return f"{self.out}/metrics.json"

    @property
    def metrics_files(self) -> tuple[str, ...]:
        """Every file of the stage's that DVC reads as metrics (nested dicts of numbers)."""
        return (self.metrics, *(f"{self.out}/{name}" for name in self.extra_metrics))


# Plumbing every stage shares (params validation, the runner) does not change what a stage computes, so it
# is not a dependency: editing it must not rebuild the whole pipeline.
SHARED_CODE: tuple[str, ...] = ()

# Presto-L and its ASE baseline run the same module (stages/presto_l.py) on the same recipe (layer_dropping).
LAYER_DROPPING_PARAMS: tuple[str, ...] = ("shared.seed", "layer_dropping")
PRESTO_L_CODE: tuple[str, ...] = (
    "stages/presto_l.py", "stages/train_dit.py", "presto/distill/presto_l.py", "presto/training/dit_trainer.py",
    "presto/training/state.py", "presto/training/progress.py", "presto/models/dit.py", "presto/models/attention.py",
    "presto/models/ema.py", "presto/models/checkpoint.py", "presto/diffusion/edm.py", "presto/diffusion/noise.py",
    "presto/data/latents.py", "presto/text/condition.py",
)

# Presto-LS runs Presto-S's loop (stages/presto_s.py) with the Presto-L network as the generator.
PRESTO_S_CODE: tuple[str, ...] = (
    "stages/presto_s.py", "stages/presto_l.py", "stages/train_dit.py", "presto/distill/presto_s.py",
    "presto/models/disc_head.py", "presto/training/dit_trainer.py", "presto/training/state.py",
    "presto/training/progress.py", "presto/models/dit.py", "presto/models/attention.py", "presto/models/checkpoint.py",
    "presto/diffusion/edm.py", "presto/diffusion/noise.py", "presto/diffusion/sampling.py", "presto/data/latents.py",
    "presto/text/condition.py", "presto/eval/metrics.py", "presto/generation.py", "presto/distill/presto_l.py",
)

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
    StageSpec(
        name="train_vae",
        help="Train the audio VAE (MR-STFT + KL + multi-scale STFT discriminator, EMA); score it on val.",
        params=("shared.seed", "shared.sample_rate", "train_vae"),
        code=("stages/train_vae.py", "presto/training/vae_trainer.py", "presto/training/adversarial.py",
              "presto/training/step_loop.py",
              "presto/models/vae.py", "presto/models/audio_losses.py", "presto/models/discriminators.py",
              "presto/models/ema.py", "presto/models/checkpoint.py", "presto/data/shards.py", "presto/audio/io.py"),
        upstream=("prepare", "augment"),  # augment's manifest lists prepare's clips too
        resources_key="train_vae",
    ),
    StageSpec(
        name="train_stereo",
        help="Train the mono-to-stereo upmixer (side signal: MR-STFT + multi-scale STFT discriminator); score "
             "it on val stereo clips beside dual mono.",
        params=("shared.seed", "shared.sample_rate", "train_stereo"),
        code=("stages/train_stereo.py", "presto/training/upmix_trainer.py", "presto/training/adversarial.py",
              "presto/models/upmixer.py", "presto/eval/stereo.py",
              "presto/models/vae.py", "presto/models/audio_losses.py", "presto/models/discriminators.py",
              "presto/models/checkpoint.py", "presto/training/step_loop.py", "presto/training/state.py",
              "presto/training/progress.py", "presto/data/shards.py"),
        upstream=("prepare",),
        resources_key="train_stereo",
    ),
    StageSpec(
        name="encode",
        help="Encode every clip to normalised latents (sigma_data) and every caption to text embeddings.",
        params=("shared.sample_rate", "encode"),
        code=("stages/encode.py", "stages/train_vae.py", "presto/data/latents.py", "presto/data/shards.py",
              "presto/models/vae.py", "presto/models/checkpoint.py", "presto/text/encoder.py",
              "presto/text/condition.py"),
        upstream=("prepare", "augment", "caption", "train_vae"),
        resources_key="encode",
    ),
    StageSpec(
        name="train_dit",
        help="Train the base EDM DiT on the latents with Ray Train (DDP over workers); EMA weights out.",
        params=("shared.seed", "train_dit"),
        # The sampling code (generation, samplers, guidance, the VAE decoder) only makes the preview clips
        # logged to MLflow, none of the outs, so editing it does not retrain the model.
        code=("stages/train_dit.py", "presto/training/dit_trainer.py", "presto/training/state.py",
              "presto/training/progress.py", "presto/models/dit.py", "presto/models/attention.py",
              "presto/models/ema.py", "presto/models/checkpoint.py", "presto/diffusion/edm.py",
              "presto/diffusion/noise.py", "presto/data/latents.py", "presto/text/condition.py"),
        upstream=("encode", "train_vae"),
        resources_key=None,  # a driver: the Ray Train workers reserve train_dit.cpus/gpus_per_worker
    ),
    StageSpec(
        name="presto_l",
        help="Fine-tune the base DiT into Presto-L: budget-conditioned layer dropping over a sigma schedule.",
        params=LAYER_DROPPING_PARAMS + ("presto_l",),
        code=PRESTO_L_CODE,
        upstream=("train_dit", "encode"),
        resources_key="layer_dropping",
    ),
    StageSpec(
        name="ase",
        help="The plain-ASE baseline of Presto-L: presto_l's recipe, early exit without budget conditioning.",
        params=LAYER_DROPPING_PARAMS + ("ase",),
        code=PRESTO_L_CODE,
        upstream=("train_dit", "encode"),
        resources_key="layer_dropping",
        module_name="presto_l",
    ),
    StageSpec(
        name="presto_s",
        help="Distil the base DiT into a few-step generator with Presto-S (distribution matching + GAN).",
        params=("shared.seed", "presto_s"),
        code=PRESTO_S_CODE,
        upstream=("train_dit", "encode"),
        resources_key="presto_s",
    ),
    StageSpec(
        name="presto_ls",
        help="Distil the Presto-L model into a few-step generator with Presto-S: the generator runs a milder "
             "layer schedule, the real and fake scores every block.",
        params=("shared.seed", "presto_ls"),
        code=PRESTO_S_CODE + ("stages/presto_ls.py",),
        upstream=("train_dit", "presto_l", "encode"),
        resources_key="presto_ls",
    ),
    StageSpec(
        name="evaluate",
        help="Score every model and setting on the test split (quality, text adherence, latency; the upmixer's "
             "stereo against real stereo clips); write the listening report; register the models for serving.",
        params=("evaluate",),
        code=("stages/evaluate.py", "presto/eval", "presto/generation.py", "presto/diffusion", "presto/models/dit.py",
              "presto/models/attention.py", "presto/models/vae.py", "presto/models/checkpoint.py",
              "presto/models/upmixer.py", "presto/models/audio_losses.py", "stages/train_stereo.py",
              "presto/distill/presto_l.py", "presto/text", "presto/data/analysis.py", "presto/data/music.py",
              "presto/data/shards.py", "presto/data/latents.py", "presto/audio/plots.py"),
        # The models evaluate.runs may name (adding a model is a run in params.yaml and its stage here), and the
        # upmixer every model is registered with.
        upstream=("prepare", "caption", "train_vae", "encode", "train_stereo", "train_dit", "presto_l", "ase",
                  "presto_s", "presto_ls"),
        plots=(Plot("quality_vs_latency.json", x="latency_ms", y="fad", title="FAD vs latency at batch 1"),
               Plot("fad_vs_steps.json", x="steps", y="fad", title="FAD vs sampling steps"),
               Plot("fad_vs_rho.json", x="rho", y="fad", title="FAD vs the step schedule's rho")),
        extra_metrics=("comparisons.json", "stereo.json"),
        resources_key="evaluate",
    ),
)

BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}


def get(name: str) -> StageSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are: {', '.join(BY_NAME)}") from None
