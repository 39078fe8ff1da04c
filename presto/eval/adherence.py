"""Text adherence without a text-audio model: does the audio have the tempo and the key its prompt asks for?

A prompt may state a tempo ("at 120 bpm", "--bpm 100") and a key ("in Bb major"); `prompt_target` reads
them. The audio's own tempo and key come from presto.data.analysis (the same estimators that caption the
training data), and the scores are over the prompts that state each attribute:

    tempo_error  = mean_i 100 |t_i - T_i| / T_i         (%; a clip with no measurable pulse counts 100 %)
    key_accuracy = mean_i [k_i == K_i]                  (exact key)
    key_mirex    = mean_i mirex(k_i, K_i)               (1 exact, 0.5 fifth, 0.3 relative, 0.2 parallel)

The estimators are imperfect on real music too (caption's metrics report how often they agree with the
labels), so the real test clips' own scores against their prompts are the ceiling to compare with.

Best of N (inference-time scaling): among N candidates for one prompt, keep the one with the highest
score; `adherence_score` is the score without CLAP, the mean of the per-attribute credits above
(1 - relative tempo error, clipped at 0, and the MIREX key credit), so selection maximises exactly what
tempo_error and key_mirex report. A prompt that states neither gives no score: its first candidate is kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from presto.data.analysis import MAX_BPM, MIN_BPM, MIREX_KEY_SCORE, estimate_key, estimate_tempo, key_relation
from presto.data.music import key_name, parse_key

# "120 bpm", "120.5 BPM", "--bpm 100", "--bpm=100"
_TEMPO = re.compile(r"--bpm\s*=?\s*(\d+(?:\.\d+)?)|(\d+(?:\.\d+)?)\s*bpm\b", re.IGNORECASE)
# "Bb major", "F# minor", "C minor": an upper-case tonic, so that "a minor change" is not read as A minor.
_KEY = re.compile(r"\b([A-G])(#|b)?\s+((?i:major|minor))\b")


@dataclass(frozen=True)
class Target:
    """What a prompt asks for: a tempo in bpm and a key (key_name spelling), None where it says nothing."""

    tempo: float | None
    key: str | None


@dataclass(frozen=True)
class Measured:
    """What a clip sounds like: its estimated tempo (NaN without a pulse) and key (None without pitch)."""

    tempo: float
    key: str | None


def prompt_target(prompt: str) -> Target:
    """The first plausible tempo (within [MIN_BPM, MAX_BPM]) and the first key a prompt states."""
    tempo = None
    for match in _TEMPO.finditer(prompt):
        value = float(match.group(1) or match.group(2))
        if MIN_BPM <= value <= MAX_BPM:
            tempo = value
            break
    key_match = _KEY.search(prompt)
    key = key_name(*parse_key("".join(key_match.groups(default="")))) if key_match else None
    return Target(tempo, key)


def measure(audio: np.ndarray, sr: int) -> Measured:
    """The tempo and key a clip has, by the caption stage's estimators."""
    return Measured(estimate_tempo(audio, sr), estimate_key(audio, sr)[0])


def _check(targets: Sequence[Target], measured: Sequence[Measured]) -> None:
    if len(targets) != len(measured):
        raise ValueError(f"{len(targets)} targets but {len(measured)} measured clips; expected one per clip")


def tempo_credit(target: float, tempo: float) -> float:
    """1 - relative tempo error, clipped to [0, 1]; 0 for a clip without a pulse (NaN)."""
    if not math.isfinite(tempo):
        return 0.0
    return max(0.0, 1.0 - abs(tempo - target) / target)


def tempo_error(targets: Sequence[Target], measured: Sequence[Measured]) -> float | None:
    """Mean relative tempo error in %, over the clips whose prompt states a tempo (None if none does)."""
    _check(targets, measured)
    errors = [100.0 * (abs(m.tempo - t.tempo) / t.tempo if math.isfinite(m.tempo) else 1.0)
              for t, m in zip(targets, measured) if t.tempo is not None]
    return float(np.mean(errors)) if errors else None


def key_accuracy(targets: Sequence[Target], measured: Sequence[Measured]) -> float | None:
    """Fraction of the clips whose prompt states a key that are estimated in exactly that key."""
    _check(targets, measured)
    hits = [m.key == t.key for t, m in zip(targets, measured) if t.key is not None]
    return float(np.mean(hits)) if hits else None


def key_mirex(targets: Sequence[Target], measured: Sequence[Measured]) -> float | None:
    """Mean MIREX key credit over the clips whose prompt states a key."""
    _check(targets, measured)
    credits = [MIREX_KEY_SCORE[key_relation(m.key, t.key)] for t, m in zip(targets, measured) if t.key is not None]
    return float(np.mean(credits)) if credits else None


def adherence_score(target: Target, measured: Measured) -> float | None:
    """Mean credit over the attributes the prompt states (tempo_credit, MIREX key credit); None if none."""
    credits = []
    if target.tempo is not None:
        credits.append(tempo_credit(target.tempo, measured.tempo))
    if target.key is not None:
        credits.append(MIREX_KEY_SCORE[key_relation(measured.key, target.key)])
    return float(np.mean(credits)) if credits else None


def best_candidates(scores: np.ndarray) -> np.ndarray:
    """Index of the best candidate per row of scores [prompts, candidates]: the highest score, the first
    one on ties, and candidate 0 for a prompt without any score (all NaN)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores: expected shape [prompts, candidates >= 1], got {scores.shape}")
    # NaN ranks below every score; argmax returns the first of equal maxima.
    return np.argmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)
