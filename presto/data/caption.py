"""Synthetic captions: what a clip's metadata and audio analysis say, phrased several ways.

A model conditioned on one fixed sentence per clip learns the sentence. Several captions per clip, with
the attributes in a shuffled order, each attribute sometimes left out and each phrased one of a few ways,
teach it what every phrase means on its own, so a prompt may name any subset of them.

Metadata wins over analysis (a labelled bpm or key is more reliable than a clip-level estimate), and a caption
given in the metadata is kept verbatim as the clip's first caption. Metadata text may hold anything
(quotes, markup, emoji, megabytes): it stays text, with control characters turned into spaces and absurd
lengths cut.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from presto.data.analysis import MAX_BPM, MIN_BPM
from presto.data.music import key_name, parse_key

MAX_FIELD_CHARS = 100  # one metadata value (a genre, an instrument, a composer)
MAX_VALUES = 8  # values kept from one list-valued field (instruments)
MAX_CAPTION_CHARS = 400  # a generous sentence; the MiniLM text encoder reads 256 word pieces at most
MAX_ATTEMPTS_PER_CAPTION = 20  # draws spent looking for a caption not yet written before repeating one

# Descriptor words, from the analysis. Thresholds sit near the 10th and 90th percentiles measured on 4 s
# clips of Bach chorales rendered with General MIDI instruments at 16 kHz (centroid 640 / 1750 Hz, onsets
# 1.8 / 11.8 per s), so a word marks a clip that stands out. Levels: prepare normalises clips to -20 dBFS,
# so the loudness words only fire on corpora kept at their own levels.
DARK_BELOW_HZ, BRIGHT_ABOVE_HZ = 650.0, 1750.0
CALM_BELOW_ONSETS_HZ, BUSY_ABOVE_ONSETS_HZ = 1.8, 11.8
QUIET_BELOW_DBFS, LOUD_ABOVE_DBFS = -35.0, -12.0

# An estimated tempo is said only with a clear pulse: on rendered chorales the estimate was right (up to
# an octave) for 96 % of clips above this clarity and 35 % of those below.
MIN_PULSE_CLARITY = 0.2

FRAMES = ("{}", "{}.", "music, {}", "A piece: {}.")
FALLBACK_CAPTION = "music"  # a clip with nothing known about it

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Attribute:
    """One thing a caption may say. `values` are shuffled in each caption (instruments); `phrasings` are
    templates with one `{}` for the joined values."""

    name: str
    values: tuple[str, ...]
    phrasings: tuple[str, ...]

    def phrase(self, rng: random.Random) -> str:
        values = list(self.values)
        rng.shuffle(values)
        return rng.choice(self.phrasings).format(join_words(values))


def join_words(words: list[str]) -> str:
    """['a'] -> 'a'; ['a', 'b'] -> 'a and b'; ['a', 'b', 'c'] -> 'a, b and c'."""
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def clean_text(value: Any, limit: int = MAX_FIELD_CHARS) -> str | None:
    """Metadata as one line of text: control characters and line breaks become spaces, runs of spaces
    one, at most `limit` characters. None for missing values (None, NaN, blank)."""
    if value is None or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, (int, float)):
        value = f"{value:g}"
    if not isinstance(value, str):
        return None
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in value)
    text = _WHITESPACE.sub(" ", text).strip()[:limit].rstrip()
    return text or None


def text_values(value: Any) -> tuple[str, ...]:
    """A list-valued field (a list, or a ';'-joined string) as distinct cleaned values."""
    if isinstance(value, str):
        items = value.split(";")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    out: list[str] = []
    for item in items:
        text = clean_text(item)
        if text and text not in out:
            out.append(text)
    return tuple(out[:MAX_VALUES])


def metadata_bpm(row: Mapping[str, Any]) -> float | None:
    """The row's `bpm` as a number, or None when absent or not a plausible tempo."""
    value = row.get("bpm")
    if isinstance(value, bool):
        return None
    try:
        bpm = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return bpm if MIN_BPM <= bpm <= MAX_BPM else None


def metadata_key(row: Mapping[str, Any]) -> str | None:
    """The row's `key` spelled as key_name spells it, or None when absent or not a major/minor key."""
    text = clean_text(row.get("key"))
    if text is None:
        return None
    try:
        return key_name(*parse_key(text))
    except ValueError:
        return None


def _descriptor(value: Any, low: float, high: float, low_word: str, high_word: str) -> str | None:
    if value is None:
        return None
    return low_word if value < low else high_word if value > high else None


def clip_attributes(row: Mapping[str, Any], analysis: Mapping[str, Any]) -> list[Attribute]:
    """Everything known about a clip, metadata first: genre, mood, instruments, composer, meter, key,
    tempo, then the brightness, busyness and loudness the analysis measured.

    The title is left out: it names a track rather than describing how it sounds.
    """
    attributes: list[Attribute] = []

    def add(name: str, values: tuple[str, ...], *phrasings: str) -> None:
        if values:
            attributes.append(Attribute(name, values, phrasings))

    add("genre", text_values(row.get("genre")), "{}", "{} music", "{} style")
    add("mood", text_values(row.get("mood")), "{}", "{} mood", "feeling {}")
    # General MIDI program names come snake_cased (acoustic_grand_piano).
    instruments = tuple(v.replace("_", " ") for v in text_values(row.get("instruments")))
    add("instruments", instruments, "{}", "featuring {}", "with {}", "played on {}")
    composer = clean_text(row.get("composer"))
    add("composer", (composer,) if composer else (), "by {}", "in the style of {}", "composed by {}")
    meter = clean_text(row.get("meter"))
    add("meter", (meter,) if meter else (), "in {} time", "{} time", "{} meter")

    # An unparseable key ('D dorian') is still worth saying as written.
    key = metadata_key(row) or clean_text(row.get("key")) or analysis.get("key")
    add("key", (key,) if key else (), "in {}", "{}", "key of {}")
    clear_pulse = (analysis.get("pulse_clarity") or 0.0) >= MIN_PULSE_CLARITY
    bpm = metadata_bpm(row) or (analysis.get("tempo_bpm") if clear_pulse else None)
    add("tempo", (str(round(bpm)),) if bpm else (), "at {} bpm", "{} bpm", "tempo {} bpm")

    brightness = _descriptor(analysis.get("centroid_hz"), DARK_BELOW_HZ, BRIGHT_ABOVE_HZ, "dark", "bright")
    add("brightness", (brightness,) if brightness else (), "{}", "{} sound", "{} timbre")
    energy = _descriptor(analysis.get("onset_rate_hz"), CALM_BELOW_ONSETS_HZ, BUSY_ABOVE_ONSETS_HZ,
                         "calm", "energetic")
    add("energy", (energy,) if energy else (), "{}", "{} feel")
    loudness = _descriptor(analysis.get("rms_dbfs"), QUIET_BELOW_DBFS, LOUD_ABOVE_DBFS, "quiet", "loud")
    add("loudness", (loudness,) if loudness else (), "{}", "played {}")
    return attributes


def synthetic_caption(attributes: list[Attribute], rng: random.Random, attribute_dropout: float) -> str:
    """One caption: each attribute kept with probability 1 - attribute_dropout (at least one is), in a
    random order, each in a random phrasing, inside a random frame."""
    if not attributes:
        return FALLBACK_CAPTION
    kept = [a for a in attributes if rng.random() >= attribute_dropout] or [rng.choice(attributes)]
    rng.shuffle(kept)
    text = rng.choice(FRAMES).format(", ".join(a.phrase(rng) for a in kept))
    return text[:MAX_CAPTION_CHARS]


def make_captions(row: Mapping[str, Any], analysis: Mapping[str, Any], *, per_clip: int,
                  attribute_dropout: float, seed: int) -> list[str]:
    """`per_clip` captions for one clip, the metadata's own caption first when it has one.

    Deterministic in (seed, clip_id). Captions differ from each other while the attributes allow it;
    a clip with too little known about it repeats some.
    """
    if per_clip < 1:
        raise ValueError(f"per_clip must be at least 1, got {per_clip}")
    if not 0 <= attribute_dropout <= 1:
        raise ValueError(f"attribute_dropout must be in [0, 1], got {attribute_dropout}")
    rng = random.Random(f"{seed}/{row['clip_id']}")
    given = clean_text(row.get("caption"), MAX_CAPTION_CHARS)
    captions = [given] if given else []
    attributes = clip_attributes(row, analysis)
    attempts = 0
    while len(captions) < per_clip:
        caption = synthetic_caption(attributes, rng, attribute_dropout)
        attempts += 1
        if caption not in captions or attempts > MAX_ATTEMPTS_PER_CAPTION * per_clip:
            captions.append(caption)
    return captions
