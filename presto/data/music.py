"""Musical labels: key names and their transposition (labels must stay true under augmentation)."""

from __future__ import annotations

import re

PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_NAMES = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_KEY = re.compile(r"^\s*([A-Ga-g])\s*(#|b|-|sharp|flat)?\s*(major|minor|maj|min|m)?\s*$", re.IGNORECASE)


def parse_key(key: str) -> tuple[int, str]:
    """'D minor', 'f# major', 'Bb', 'E-' (music21's flat), 'Am' -> (pitch class 0..11, 'major'|'minor')."""
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"not a key name: {key!r}")
    letter, accidental, mode = m.groups()
    pc = _NAMES[letter.upper()]
    if accidental:
        pc += 1 if accidental.lower() in ("#", "sharp") else -1
    # A bare lower-case letter ('a') is music21's spelling of a minor key.
    minor = (mode or "").lower() in ("minor", "min", "m") or (mode is None and letter.islower())
    return pc % 12, "minor" if minor else "major"


def key_name(pitch_class: int, mode: str) -> str:
    return f"{PITCH_CLASSES[pitch_class % 12]} {mode}"


def transpose_key(key: str, semitones: float) -> str:
    """The key after a pitch shift; shifts are whole semitones (a fractional shift has no key)."""
    if semitones != int(semitones):
        raise ValueError(f"a pitch shift of {semitones} semitones has no key; use whole semitones")
    pc, mode = parse_key(key)
    return key_name(pc + int(semitones), mode)
