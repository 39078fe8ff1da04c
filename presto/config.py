"""Typed, validated params.

Every knob lives in params.yaml (the only place with defaults); this module says what each knob may be.
Loading fails at once, with one line naming the key, the value and what is allowed, so a typo never
surfaces two hours into training.

The configs of the models, the samplers and the distillation methods live here too, not beside the torch
code they configure (those modules import them from here), so validating params never imports torch: a
stage process validates first thing, its compute runs in Ray workers, and torch costs seconds of CPU to load.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from presto.errors import ParamsError

if TYPE_CHECKING:  # annotations only: validating params must not import torch
    import torch

    from presto.diffusion.noise import NoiseDist

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]  # Adam's betas, EMA decays


def _check_sigma_range(section: Any) -> None:
    if section.sigma_min >= section.sigma_max:
        raise ValueError(f"sigma_min = {section.sigma_min} must be < sigma_max = {section.sigma_max}")


def _check_conv_stages(section: Any) -> None:
    """The strided conv stacks (VAE, upmixer): one channel multiplier per stride, an odd kernel."""
    if len(section.channel_multipliers) != len(section.strides):
        raise ValueError(f"channel_multipliers has {len(section.channel_multipliers)} entries and strides "
                         f"{len(section.strides)}: give one multiplier per stride (one per stage)")
    if section.kernel_size % 2 == 0:
        raise ValueError(f"kernel_size = {section.kernel_size} must be odd (symmetric 'same' padding)")


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


# Configs of the audio VAE, its discriminator and the upmixer (presto/models/: vae, discriminators, upmixer).
class STFTDiscriminatorConfig(Section):
    """The `vae.discriminator` section of params.yaml."""

    channels: PositiveInt  # width of every hidden layer
    fft_sizes: Annotated[list[Annotated[int, Field(ge=16)]], Field(min_length=1)]  # one sub-discriminator each
    dilations: Annotated[list[PositiveInt], Field(min_length=1)]  # time dilation of each strided layer


class VAEConfig(Section):
    """Architecture of the audio VAE (the `vae.model` section of params.yaml)."""

    channels: PositiveInt  # width C of the full-rate stage
    channel_multipliers: Annotated[list[PositiveInt], Field(min_length=1)]  # stage i outputs C * m_i channels
    strides: Annotated[list[Annotated[int, Field(ge=2)]], Field(min_length=1)]  # downsampling per stage
    latent_channels: PositiveInt
    dilations: Annotated[list[PositiveInt], Field(min_length=1)]  # one residual unit per dilation
    kernel_size: Annotated[int, Field(ge=3)]  # residual and stem/head convs; odd, so padding is symmetric

    @model_validator(mode="after")
    def _consistent(self) -> "VAEConfig":
        _check_conv_stages(self)
        return self


class UpmixerConfig(Section):
    """Architecture of the upmixer (the `train_stereo.model` section of params.yaml)."""

    channels: PositiveInt  # width C of the full-rate stage
    channel_multipliers: Annotated[list[PositiveInt], Field(min_length=1)]  # stage i outputs C * m_i channels
    strides: Annotated[list[Annotated[int, Field(ge=2)]], Field(min_length=1)]  # downsampling per stage
    dilations: Annotated[list[PositiveInt], Field(min_length=1)]  # one residual unit per dilation
    kernel_size: Annotated[int, Field(ge=3)]  # odd, so padding is symmetric

    @model_validator(mode="after")
    def _consistent(self) -> "UpmixerConfig":
        _check_conv_stages(self)
        return self


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
    ema_decay: Beta
    mel_fft_size: Annotated[int, Field(ge=16)]
    n_mels: PositiveInt


class TrainStereoParams(AudioGANParams):
    """The mono-to-stereo upmixer and its training (stages/train_stereo.py, presto/training/upmix_trainer.py)."""

    model: UpmixerConfig
    side_weight: NonNegFloat
    channel_weight: NonNegFloat


# Config of the text encoder (presto/text/encoder.py).
class TextEncoderConfig(Section):
    kind: Literal["minilm", "t5"]
    path: str | None  # a local model folder; None: the packaged MiniLM (kind minilm only)
    max_tokens: PositiveInt


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


# Configs of the DiT (presto/models/dit.py) and of how to sample it (presto/generation.py).
class DiTConfig(Section):
    latent_channels: PositiveInt
    width: PositiveInt
    depth: PositiveInt
    heads: PositiveInt
    mlp_ratio: PositiveFloat
    text_dim: PositiveInt  # size of the text encoder's token states (384 for MiniLM-L6)
    budget_conditioning: bool  # embed the layer budget into the adaLN conditioning (Presto-L)

    @model_validator(mode="after")
    def _heads_fit(self) -> "DiTConfig":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        if (self.width // self.heads) % 2:
            raise ValueError(f"width / heads = {self.width // self.heads} must be even (rotary positions)")
        return self

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_width(self) -> int:
        return round(self.width * self.mlp_ratio)


# The keys of presto.diffusion.sampling.SAMPLERS, named here so that validating a recipe needs no torch
# (tests/test_sampling.py checks that the two agree).
SAMPLER_NAMES = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "consistency")


class SamplingRecipe(Section):
    """How to sample: sampler, step grid, guidance, and an optional layer budget per grid level."""

    sampler: str
    steps: PositiveInt
    rho: PositiveFloat
    sigma_min: PositiveFloat
    sigma_max: PositiveFloat
    guidance: Literal["cfgpp", "cfg", "none"]
    scale: float  # CFG++: w in [0, 1] (paper 0.8); CFG: any finite w; ignored for none
    budgets: Annotated[list[PositiveInt], Field(min_length=1)] | None  # one per step (Presto-L); None: all blocks

    @model_validator(mode="after")
    def _consistent(self) -> "SamplingRecipe":
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler {self.sampler!r} is not one of {sorted(SAMPLER_NAMES)}")
        _check_sigma_range(self)
        if self.guidance == "cfgpp" and not 0 <= self.scale <= 1:
            raise ValueError(f"scale = {self.scale}: CFG++ takes w in [0, 1] (paper 0.8); "
                             "a plain-CFG scale such as 4.5 needs guidance 'cfg'")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale = {self.scale} must be finite")
        if self.budgets is not None and len(self.budgets) != self.steps:
            raise ValueError(f"budgets has {len(self.budgets)} entries for {self.steps} steps: give one per step")
        return self

    def sigmas(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The step grid: the consistency sampler's levels for `consistency`, else Karras' rho grid to 0."""
        # Imported here, not at the top: params validation stays torch-free.
        from presto.diffusion.sampling import consistency_sigmas, karras_sigmas

        grid = consistency_sigmas if self.sampler == "consistency" else karras_sigmas
        return grid(self.steps, self.sigma_min, self.sigma_max, self.rho, device=device)


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
    betas: tuple[Beta, Beta]
    weight_decay: NonNegFloat
    grad_clip: PositiveFloat
    ema_decay: Beta
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
        _check_sigma_range(self)
        if self.use_gpu != (self.gpus_per_worker > 0):
            raise ValueError(f"use_gpu = {self.use_gpu} with gpus_per_worker = {self.gpus_per_worker}: "
                             "a GPU run needs gpus_per_worker > 0, a CPU run 0")
        return self


# Configs of noise-level distributions (presto/diffusion/noise.py) and layer dropping (presto/distill/presto_l.py).
class TrainSigmaConfig(Section):
    """sigma^train (EDM log-normal, truncated to [sigma_min, sigma_max])."""

    kind: Literal["train"]
    p_mean: float
    p_std: PositiveFloat
    sigma_min: PositiveFloat
    sigma_max: PositiveFloat

    @model_validator(mode="after")
    def _ordered(self) -> "TrainSigmaConfig":
        _check_sigma_range(self)
        return self


class InferenceSigmaConfig(Section):
    """sigma^inf (continuous Karras schedule)."""

    kind: Literal["inf"]
    sigma_min: PositiveFloat
    sigma_max: PositiveFloat
    rho: PositiveFloat

    @model_validator(mode="after")
    def _ordered(self) -> "InferenceSigmaConfig":
        _check_sigma_range(self)
        return self


SingleSigmaConfig = Annotated[TrainSigmaConfig | InferenceSigmaConfig, Field(discriminator="kind")]


class MixtureComponentConfig(Section):
    weight: PositiveFloat
    dist: SingleSigmaConfig


class MixtureSigmaConfig(Section):
    """A weighted mixture of train/inf distributions (the paper's "train/inf" entries)."""

    kind: Literal["mixture"]
    components: Annotated[list[MixtureComponentConfig], Field(min_length=1)]


NoiseDistConfig = Annotated[
    TrainSigmaConfig | InferenceSigmaConfig | MixtureSigmaConfig, Field(discriminator="kind")
]
"""One noise-level distribution in params.yaml, chosen by `kind`, e.g.
`{kind: inf, sigma_min: 0.002, sigma_max: 80, rho: 7}`."""


class BudgetScheduleConfig(Section):
    """Active blocks per noise band, counted out of `reference_depth`, lowest-noise band first."""

    reference_depth: PositiveInt
    budgets: Annotated[list[PositiveInt], Field(min_length=1)]
    sigma_bounds: list[PositiveFloat]  # upper sigma of every band but the last (which is open above)

    @model_validator(mode="after")
    def _consistent(self) -> "BudgetScheduleConfig":
        if len(self.sigma_bounds) != len(self.budgets) - 1:
            raise ValueError(f"sigma_bounds has {len(self.sigma_bounds)} values; {len(self.budgets)} budgets need "
                             f"{len(self.budgets) - 1} (every band but the highest has an upper bound)")
        if any(a >= b for a, b in zip(self.sigma_bounds, self.sigma_bounds[1:])):
            raise ValueError(f"sigma_bounds {self.sigma_bounds} must be strictly increasing")
        if max(self.budgets) > self.reference_depth:
            raise ValueError(f"budgets {self.budgets} must not exceed reference_depth = {self.reference_depth}")
        if any(a < b for a, b in zip(self.budgets, self.budgets[1:])):
            raise ValueError(f"budgets {self.budgets} must not increase with sigma (fewer blocks at higher noise)")
        return self


class LayerDropRecipe(Section):
    """How a layer-dropping model is fine-tuned from the teacher: what Presto-L and its ASE baseline share."""

    lr: PositiveFloat
    betas: tuple[Beta, Beta]
    weight_decay: NonNegFloat
    grad_clip: PositiveFloat
    ema_decay: Beta
    cond_dropout: Fraction
    sigma: NoiseDistConfig  # training noise levels; each one is trained at the budget the schedule gives it
    schedule: BudgetScheduleConfig


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


# Configs of Presto-S (presto/distill/presto_s.py) and its discriminator head (presto/models/disc_head.py).
# Presto-S's noise roles, each naming one of PrestoSConfig.sigmas.
ROLES = ("p_gen", "p_dmd", "p_dsm", "p_gan")


class PrestoSConfig(Section):
    """The method's knobs. Each of the four noise roles names one of `sigmas`, so that a row of the paper's
    Table 1 ablation is a one-word change (e.g. p_dmd: inf)."""

    sigmas: Annotated[dict[str, NoiseDistConfig], Field(min_length=1)]  # the distributions, by name
    p_gen: str  # noise on real latents fed to G (paper: sigma^inf)
    p_dmd: str  # re-noising G's output for the DMD gradient (paper: sigma^train)
    p_dsm: str  # re-noising G's output to train the fake score (paper: sigma^train)
    p_gan: str  # noise on real and generated latents for the discriminator (paper: sigma^train)
    real_guidance: NonNegFloat  # plain-CFG scale w of the real score (paper: 4.5)
    critic_updates_per_generator: PositiveInt  # paper: 5; fewer than 4 was unstable
    nu_critic: NonNegFloat  # weight of the discriminator's LSGAN loss in the critic loss
    nu_generator: NonNegFloat  # weight of the generator's LSGAN loss in the generator loss
    generator_lr: PositiveFloat
    critic_lr: PositiveFloat  # fake score and discriminator head
    betas: tuple[Beta, Beta]  # Adam's (beta1, beta2)
    max_grad_norm: PositiveFloat  # each optimiser step clips its gradient to this global norm
    generator_ema_decay: Beta  # EMA of G's weights per generator update (the exported G); 0: G's last weights

    @model_validator(mode="after")
    def _roles_name_a_distribution(self) -> "PrestoSConfig":
        for role in ROLES:
            if getattr(self, role) not in self.sigmas:
                raise ValueError(f"{role} = {getattr(self, role)!r} is not one of sigmas {sorted(self.sigmas)}")
        return self

    def noise_dist(self, role: str) -> NoiseDist:
        """The distribution that `role` (one of ROLES) names."""
        # Imported here, not at the top: params validation stays torch-free.
        from presto.diffusion.noise import make_noise_dist

        return make_noise_dist(self.sigmas[getattr(self, role)])


class DiscHeadConfig(Section):
    channels: PositiveInt  # conv channels of every block
    n_blocks: PositiveInt  # conv blocks (paper: 4)
    groups: PositiveInt  # GroupNorm groups
    target_rate: PositiveFloat  # logits per second it aims at (paper: about 2.8)

    @model_validator(mode="after")
    def _groups_divide(self) -> "DiscHeadConfig":
        if self.channels % self.groups:
            raise ValueError(f"channels {self.channels} must be a multiple of groups {self.groups}")
        return self


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

