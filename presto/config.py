"""Typed, validated params.

Every knob lives in params.yaml (the only place with defaults); this module says what each knob may be.
Loading fails at once, with one line naming the key, the value and what is allowed, so a typo never
surfaces two hours into training.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from presto.errors import ParamsError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    """A params section: no unknown keys, immutable. Lax types so that YAML's `1e-4` (a string to
    PyYAML) still reads as a number."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(Section):
    """What one stage asks Ray for."""

    cpus: PositiveFloat
    gpus: NonNegFloat


class SharedParams(Section):
    profile: Literal["demo", "science", "gpu", "paper"]
    seed: NonNegInt
    sample_rate: Annotated[int, Field(ge=8000, le=192000)]
    clip_seconds: PositiveFloat


class DemoCorpusParams(Section):
    minutes: PositiveFloat
    max_piece_seconds: PositiveFloat
    sources: Annotated[list[str], Field(min_length=1)]
    instruments: Annotated[list[str], Field(min_length=1)]
    tempo_range: tuple[PositiveFloat, PositiveFloat]
    transpose_range: tuple[int, int]
    stereo: bool
    render_timeout_s: PositiveFloat
    max_render_mb: PositiveFloat
    soundfont: str | None
    resources: Resources

    @model_validator(mode="after")
    def _ranges_ordered(self) -> "DemoCorpusParams":
        if self.tempo_range[0] > self.tempo_range[1]:
            raise ValueError(f"tempo_range {list(self.tempo_range)} must be [low, high] with low <= high")
        if self.transpose_range[0] > self.transpose_range[1]:
            raise ValueError(f"transpose_range {list(self.transpose_range)} must be [low, high] with low <= high")
        return self


class PrepareParams(Section):
    corpus_dir: str
    metadata: str | None
    hop_seconds: PositiveFloat
    min_seconds: PositiveFloat
    max_file_seconds: PositiveFloat
    silence_dbfs: Annotated[float, Field(lt=0)]
    loudness_dbfs: Annotated[float, Field(lt=0)]
    peak_dbfs: Annotated[float, Field(le=0)]
    duplicate_tolerance_db: PositiveFloat
    val_fraction: Fraction
    test_fraction: Fraction
    shard_clips: PositiveInt
    keep_stereo: bool
    resources: Resources

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> "PrepareParams":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction} must be < 1"
            )
        return self

    @model_validator(mode="after")
    def _peak_above_loudness(self) -> "PrepareParams":
        if self.peak_dbfs <= self.loudness_dbfs:
            raise ValueError(f"peak_dbfs = {self.peak_dbfs} must be above loudness_dbfs = {self.loudness_dbfs} "
                             "(a peak is never below the RMS level)")
        return self


class AugmentParams(Section):
    pitch_semitones: list[Annotated[float, Field(ge=-12, le=12)]]
    stretch_rates: list[Annotated[float, Field(ge=0.5, le=2.0)]]
    chunk_clips: PositiveInt
    resources: Resources

    @model_validator(mode="after")
    def _no_identity(self) -> "AugmentParams":
        if 0 in self.pitch_semitones or 1.0 in self.stretch_rates:
            raise ValueError("pitch_semitones must not hold 0 and stretch_rates must not hold 1.0 "
                             "(the original clip is always kept)")
        return self

    @model_validator(mode="after")
    def _whole_semitones(self) -> "AugmentParams":
        # A fractional shift leaves no key to label the clip with, and labels must stay true.
        fractional = [k for k in self.pitch_semitones if k != int(k)]
        if fractional:
            raise ValueError(f"pitch_semitones {fractional} must be whole semitones")
        return self


class CaptionParams(Section):
    per_clip: PositiveInt
    attribute_dropout: Fraction
    resources: Resources


# Sections defined beside the code they configure (they import torch, and they import this module), so
# this module cannot import them when it loads: a params class names them as usual, each one is listed here
# with its module, and `bind_nested_sections` resolves them before the first validation.
NESTED_SECTIONS: dict[str, str] = {
    "VAEConfig": "presto.models.vae",
    "STFTDiscriminatorConfig": "presto.models.discriminators",
    "UpmixerConfig": "presto.models.upmixer",
    "TextEncoderConfig": "presto.text.encoder",
    "DiTConfig": "presto.models.dit",
    "SamplingRecipe": "presto.generation",
    "LayerDropRecipe": "presto.distill.presto_l",
    "PrestoSConfig": "presto.distill.presto_s",
    "DiscHeadConfig": "presto.models.disc_head",
    "BudgetScheduleConfig": "presto.distill.presto_l",
}
if TYPE_CHECKING:
    from presto.models.discriminators import STFTDiscriminatorConfig
    from presto.models.upmixer import UpmixerConfig
    from presto.models.vae import VAEConfig
    from presto.generation import SamplingRecipe
    from presto.models.dit import DiTConfig
    from presto.text.encoder import TextEncoderConfig
    from presto.distill.presto_l import BudgetScheduleConfig, LayerDropRecipe
    from presto.distill.presto_s import PrestoSConfig
    from presto.models.disc_head import DiscHeadConfig


class AudioGANParams(Section):
    """What the audio GAN trainers share (the VAE, the upmixer): crops, Adam, the multi-resolution STFT loss,
    the discriminator and its warm-up, the step loop's intervals (presto/training/step_loop.py)."""

    discriminator: STFTDiscriminatorConfig
    steps: PositiveInt
    batch: PositiveInt
    segment_seconds: PositiveFloat
    lr: PositiveFloat
    betas: tuple[Fraction, Fraction]
    stft_fft_sizes: Annotated[list[Annotated[int, Field(ge=16)]], Field(min_length=1)]
    adversarial_weight: NonNegFloat
    feature_matching_weight: NonNegFloat
    grad_clip: PositiveFloat
    disc_warmup_steps: NonNegInt
    log_every: PositiveInt
    ckpt_every: PositiveInt
    val_every: PositiveInt
    val_clips: PositiveInt
    examples: NonNegInt
    resources: Resources


class TrainVAEParams(AudioGANParams):
    model: VAEConfig
    stft_weight: NonNegFloat
    kl_weight: NonNegFloat
    ema_decay: Annotated[float, Field(ge=0, lt=1)]
    mel_fft_size: Annotated[int, Field(ge=16)]
    n_mels: PositiveInt


class TrainStereoParams(AudioGANParams):
    """The mono-to-stereo upmixer and its training (stages/train_stereo.py, presto/training/upmix_trainer.py)."""

    model: UpmixerConfig
    side_weight: NonNegFloat
    channel_weight: NonNegFloat


class EncodeParams(Section):
    sigma_data: PositiveFloat
    text_encoder: TextEncoderConfig
    batch: PositiveInt
    chunk_seconds: PositiveFloat
    mirror_edges: bool
    shard_clips: PositiveInt
    text_batch: PositiveInt
    shard_captions: PositiveInt
    resources: Resources


class LatentLoopParams(Section):
    """A training loop over random crops of encode's latents, validated at fixed noise levels (train_dit, and
    the presto_l and ase fine-tunes)."""

    batch: PositiveInt
    crop_frames: PositiveInt
    steps: PositiveInt
    log_every: PositiveInt
    ckpt_every: PositiveInt
    val_every: PositiveInt
    val_clips: PositiveInt
    val_sigmas: Annotated[list[PositiveFloat], Field(min_length=1)]


class TrainDiTParams(LatentLoopParams):
    """The base EDM DiT and its training (stages/train_dit.py, presto/training/dit_trainer.py)."""

    model: DiTConfig
    p_mean: float
    p_std: PositiveFloat
    sigma_min: PositiveFloat
    sigma_max: PositiveFloat
    sigma_data: PositiveFloat
    cond_dropout: Fraction
    lr: PositiveFloat
    warmup_steps: NonNegInt
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]]
    weight_decay: NonNegFloat
    grad_clip: PositiveFloat
    ema_decay: Annotated[float, Field(ge=0, lt=1)]
    samples: NonNegInt
    sample_seconds: PositiveFloat
    sample_recipe: SamplingRecipe
    workers: PositiveInt
    use_gpu: bool
    cpus_per_worker: PositiveFloat
    gpus_per_worker: NonNegFloat
    max_failures: NonNegInt

    @model_validator(mode="after")
    def _consistent(self) -> "TrainDiTParams":
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min = {self.sigma_min} must be < sigma_max = {self.sigma_max}")
        if self.use_gpu != (self.gpus_per_worker > 0):
            raise ValueError(f"use_gpu = {self.use_gpu} with gpus_per_worker = {self.gpus_per_worker}: "
                             "a GPU run needs gpus_per_worker > 0, a CPU run 0")
        return self


class LayerDroppingParams(LatentLoopParams):
    """What the presto_l stage and its plain-ASE baseline, the ase stage, share (stages/presto_l.py,
    presto/distill/presto_l.py): one recipe and data, so the two differ only in what Presto-L changes."""

    recipe: LayerDropRecipe
    seed: NonNegInt | None  # the fine-tune's batches and noise; None: shared.seed (validation noise always is)
    resources: Resources


# How a layer-dropping fine-tune differs from plain ASE: presto_l makes both of Presto-L's changes (the budget
# embedding and the reroute to the last block), ase neither, embed_only and reroute_only one each (ablations).
LayerDropMode = Literal["presto_l", "ase", "embed_only", "reroute_only"]


class PrestoLParams(Section):
    mode: LayerDropMode  # anything but presto_l turns the presto_l stage into an ablation
    nu_self_distill: NonNegFloat


class AseParams(Section):
    nu_self_distill: NonNegFloat


class PrestoSParams(Section):
    """Presto-S step distillation of train_dit's model (stages/presto_s.py, presto/distill/presto_s.py)."""

    method: PrestoSConfig
    head: DiscHeadConfig  # the discriminator head on the fake score's middle block
    batch: PositiveInt
    crop_frames: PositiveInt
    iterations: PositiveInt  # critic turns; every method.critic_updates_per_generator-th also updates G
    log_every: PositiveInt
    ckpt_every: PositiveInt
    recipe: SamplingRecipe  # how the generator samples, written to <stage>.json beside the model
    eval_steps: Annotated[list[PositiveInt], Field(min_length=1)]
    eval_clips: PositiveInt
    seed: NonNegInt | None  # the distillation's batches, noise and head init; None: shared.seed (scoring noise always is)
    resources: Resources

    @model_validator(mode="after")
    def _generator_recipe(self) -> "PrestoSParams":
        r = self.recipe
        if r.sampler != "consistency" or r.guidance != "none" or r.budgets is not None:
            raise ValueError(f"recipe: a Presto-S generator samples with sampler consistency, guidance none and "
                             f"budgets null (guidance is distilled in; Presto-LS derives its budgets from its "
                             f"schedule), got {r.sampler}, {r.guidance}, {r.budgets}")
        return self


class PrestoLSParams(PrestoSParams):
    """Presto-LS (stages/presto_ls.py): Presto-S on presto_l's network, the generator running `schedule`'s layer
    budgets while the real and fake scores run every block. The other knobs mean what they do in presto_s."""

    schedule: BudgetScheduleConfig  # the generator's blocks per noise band (presto_l's schema, milder)


CompileChoice = Literal["auto", "on", "off"]  # torch.compile for inference (presto.fast_path)


class GenerateParams(Section):
    """Defaults of `presto generate` (no stage reads them)."""

    recipe: SamplingRecipe
    seconds: PositiveFloat
    device: str  # auto (CUDA when available), cpu, cuda, cuda:N
    compile: CompileChoice  # auto: on for CUDA, off on a CPU

    @model_validator(mode="before")
    @classmethod
    def _yaml_switch(cls, raw: Any) -> Any:
        # YAML 1.1 reads a bare on / off as true / false.
        if isinstance(raw, dict) and isinstance(raw.get("compile"), bool):
            return raw | {"compile": "on" if raw["compile"] else "off"}
        return raw


class EmbedderParams(Section):
    """The audio embedding the distribution metrics use (presto/eval/embedders.py): the offline default, or
    LAION-CLAP from a local checkpoint (the paper's embedding, and the only one giving a CLAP score)."""

    kind: Literal["default", "clap"]
    checkpoint: str | None  # clap: path of a LAION-CLAP checkpoint (.pt or .safetensors); never downloaded
    audio_model: str  # clap: HTSAT-base for LAION's music checkpoint, HTSAT-tiny for 630k-audioset
    enable_fusion: bool  # clap: the checkpoint's fusion setting

    @model_validator(mode="after")
    def _clap_needs_checkpoint(self) -> "EmbedderParams":
        if self.kind == "clap" and not self.checkpoint:
            raise ValueError("kind clap needs a checkpoint: the local path of a LAION-CLAP checkpoint")
        return self


class EvalRun(Section):
    """One model at one setting: `name` (as the paper's models), the `stage` whose out folder holds its model/
    and edm.json, and how to sample it. Its label, e.g. base/32, is name/steps."""

    name: Literal["base", "presto_s", "presto_l", "ase", "presto_ls"]
    stage: str
    recipe: SamplingRecipe

    @property
    def label(self) -> str:
        return f"{self.name}/{self.recipe.steps}"


class BestOfNParams(Section):
    """Inference-time scaling: per prompt, the best of N candidates, N as many as fit the latency budget."""

    runs: list[str]  # labels of the runs to scale; [] turns it off
    max_candidates: Annotated[int, Field(ge=2)]
    latency_budget_ms: PositiveFloat | None  # None: the reference run's latency (the time distillation saves)


class RhoSweepParams(Section):
    """One run sampled again at each rho of its step schedule (Presto-S's adaptive step schedule)."""

    run: str  # a run label
    rhos: list[PositiveFloat]  # [] turns it off


class StereoEvalParams(Section):
    """The upmixer (train_stereo) scored against the real stereo clips among the reference clips."""

    stft_fft_sizes: Annotated[list[Annotated[int, Field(ge=16)]], Field(min_length=1)]  # side/channel distances
    listen_clips: NonNegInt  # real stereo test clips in the report: real, upmixed from mono, mono


class EvaluateParams(Section):
    """The evaluate stage (stages/evaluate.py): every run against the test split, then the report."""

    runs: Annotated[list[EvalRun], Field(min_length=1)]
    reference_run: str  # the label whose latency speedup_vs_base divides by
    n_prompts: PositiveInt
    reference_clips: PositiveInt
    seconds: PositiveFloat
    seeds: Annotated[list[NonNegInt], Field(min_length=1)]
    batch: PositiveInt
    latency_repeats: PositiveInt  # rounds of each run taking turns with reference_run, for its speedup_vs_base
    compare_latency_repeats: PositiveInt  # rounds of each compare pair taking turns, for its latency_ratio
    fad_bootstrap: NonNegInt  # resamples of the generated clips for fad_std and fad_vs_reference_std; 0: none
    compare: list[tuple[str, str]]  # pairs of run labels (a, b): FAD(a) - FAD(b), paired spread, latency ratio
    embedder: EmbedderParams
    mmd_bandwidth: PositiveFloat
    prdc_k: PositiveInt
    best_of_n: BestOfNParams
    rho_sweep: RhoSweepParams
    stereo: StereoEvalParams
    resources: Resources

    @model_validator(mode="after")
    def _consistent(self) -> "EvaluateParams":
        labels = [r.label for r in self.runs]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ValueError(f"runs {repeated} appear twice: each model and step count is one run")
        named = ([("reference_run", self.reference_run)] + [("best_of_n.runs", r) for r in self.best_of_n.runs]
                 + [("compare", label) for pair in self.compare for label in pair])
        if self.rho_sweep.rhos:
            named.append(("rho_sweep.run", self.rho_sweep.run))
        for key, label in named:
            if label not in labels:
                raise ValueError(f"{key} = {label!r} is not a run; runs are {labels}")
        stages = {(r.name, r.stage) for r in self.runs}
        if len(stages) != len({name for name, _ in stages}):
            raise ValueError(f"runs name one model from several stages {sorted(stages)}: a name is one model")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed (a repeated seed repeats the clip)")
        # PRDC's k-nearest-neighbour balls need k other points in each set.
        if self.n_prompts * len(self.seeds) <= self.prdc_k or self.reference_clips <= self.prdc_k:
            raise ValueError(f"prdc_k = {self.prdc_k} needs more than k generated clips (n_prompts x seeds = "
                             f"{self.n_prompts * len(self.seeds)}) and reference clips ({self.reference_clips})")
        return self


class Params(Section):
    """The whole params.yaml. Sections of stages that are not built yet are absent."""

    shared: SharedParams
    demo_corpus: DemoCorpusParams
    prepare: PrepareParams
    augment: AugmentParams
    caption: CaptionParams
    train_vae: TrainVAEParams
    train_stereo: TrainStereoParams
    encode: EncodeParams
    train_dit: TrainDiTParams
    layer_dropping: LayerDroppingParams
    presto_l: PrestoLParams
    ase: AseParams
    presto_s: PrestoSParams
    presto_ls: PrestoLSParams
    generate: GenerateParams
    evaluate: EvaluateParams

    @model_validator(mode="after")
    def _hop_fits_clip(self) -> "Params":
        if self.prepare.hop_seconds > self.shared.clip_seconds * 4:
            raise ValueError(
                f"prepare.hop_seconds = {self.prepare.hop_seconds} is over 4x shared.clip_seconds "
                f"({self.shared.clip_seconds}): most audio would be skipped"
            )
        return self

    @model_validator(mode="after")
    def _dit_fits_latents(self) -> "Params":
        # The EDM preconditioning assumes data of std sigma_data: the latents must be scaled to it.
        if self.train_dit.sigma_data != self.encode.sigma_data:
            raise ValueError(f"train_dit.sigma_data = {self.train_dit.sigma_data} must equal encode.sigma_data = "
                             f"{self.encode.sigma_data} (the std the latents are normalised to)")
        if self.train_dit.model.latent_channels != self.train_vae.model.latent_channels:
            raise ValueError(f"train_dit.model.latent_channels = {self.train_dit.model.latent_channels} must equal "
                             f"train_vae.model.latent_channels = {self.train_vae.model.latent_channels}")
        return self


def bind_nested_sections() -> None:
    """Resolve NESTED_SECTIONS in every params class of this module (idempotent; cheap after the first call)."""
    namespace = {name: getattr(importlib.import_module(module), name) for name, module in NESTED_SECTIONS.items()}
    sections = [v for v in globals().values() if isinstance(v, type) and issubclass(v, Section)]
    for cls in sections:
        if not cls.__pydantic_complete__:
            cls.model_rebuild(_types_namespace=namespace)


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}' (value {first['input']!r}); remove it or fix its spelling"
    if first["type"] == "missing":
        return f"{source}: missing key '{key}'"
    value = first.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key} = {shown}: {msg}{more}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    bind_nested_sections()
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(source, err)) from None


def load_params(path: str | Path, root: str | Path | None = None) -> Params:
    """Load and validate params.yaml; paths inside are checked relative to `root` (default: its folder)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    params = parse_params(raw, str(path.name))
    check_paths(params, Path(root) if root is not None else path.parent, str(path.name))
    return params


DEMO_CORPUS_OUT = "artifacts/demo_corpus"


def check_paths(params: Params, root: Path, source: str = "params.yaml") -> None:
    """Input folders must exist at load time, except those the pipeline itself makes (the demo corpus).

    prepare.metadata is relative to prepare.corpus_dir, so that DVC's dependency on the corpus folder
    covers it too.
    """
    corpus = params.prepare.corpus_dir
    produced = Path(corpus).as_posix().startswith(DEMO_CORPUS_OUT)
    if not produced:
        if not (root / corpus).is_dir():
            raise ParamsError(f"{source}: prepare.corpus_dir = {corpus!r}: folder not found (relative to {root})")
        meta = params.prepare.metadata
        if meta is not None and not (root / corpus / meta).is_file():
            raise ParamsError(
                f"{source}: prepare.metadata = {meta!r}: file not found in prepare.corpus_dir ({root / corpus})"
            )
    sf = params.demo_corpus.soundfont
    if sf is not None and not (root / sf).is_file():
        raise ParamsError(f"{source}: demo_corpus.soundfont = {sf!r}: file not found")


def section_items(section: BaseModel, prefix: str) -> dict[str, Any]:
    """Flatten a section into dotted keys, the same names as in params.yaml (for MLflow params)."""
    out: dict[str, Any] = {}
    for name, value in section:
        key = f"{prefix}.{name}"
        if isinstance(value, BaseModel):
            out.update(section_items(value, key))
        else:
            out[key] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """A param value as JSON-able data (lists of sections, e.g. mixture components, become dicts)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def select(params: Params, keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The dotted params named by `keys` (whole sections or single knobs), flattened."""
    out: dict[str, Any] = {}
    for key in keys:
        value: Any = params
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, BaseModel):
            out.update(section_items(value, key))
        else:
            out[key] = _plain(value)
    return out

