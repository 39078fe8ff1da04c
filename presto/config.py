"""Typed, validated params.

Every knob lives in params.yaml (the only place with defaults); this module says what each knob may be.
Loading fails at once, with one line naming the key, the value and what is allowed, so a typo never
surfaces two hours into training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

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


class Params(Section):
    """The whole params.yaml. Sections of stages that are not built yet are absent."""

    shared: SharedParams
    demo_corpus: DemoCorpusParams
    prepare: PrepareParams
    augment: AugmentParams
    caption: CaptionParams

    @model_validator(mode="after")
    def _hop_fits_clip(self) -> "Params":
        if self.prepare.hop_seconds > self.shared.clip_seconds * 4:
            raise ValueError(
                f"prepare.hop_seconds = {self.prepare.hop_seconds} is over 4x shared.clip_seconds "
                f"({self.shared.clip_seconds}): most audio would be skipped"
            )
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
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


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
            out[key] = list(value) if isinstance(value, tuple) else value
    return out
