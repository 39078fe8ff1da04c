"""MIDI -> audio with the fluidsynth command-line synthesiser, always under a time and an output-size limit.

Why the guards: a note-on without its note-off (how music21 exports grace notes, for one) keeps
fluidsynth's fast renderer writing audio for ever, about 30 MB a second; one tune wrote 17.7 GB. So the
renderer writes into a temporary file that is polled while it grows, and the process is killed once it
runs past `timeout_s` or the file past `max_bytes`. Either way the caller gets a `RenderError` that says
why, never a hang.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from presto.errors import InputError

POLL_SECONDS = 0.05  # at ~30 MB/s a runaway render overshoots the size limit by ~1.5 MB at most


class RenderError(RuntimeError):
    """One MIDI file did not render: fluidsynth failed, or was killed past its time or size limit."""


def default_soundfont() -> Path:
    """The General MIDI soundfont that pretty_midi's wheel ships (TimGM6mb, 6 MB).

    Named explicitly because fluidsynth's own default-GM.sf2 changes meaning with whatever soundfont
    package the machine happens to have installed.
    """
    import pretty_midi

    path = Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"
    if not path.is_file():
        raise InputError(f"{path}: pretty_midi's bundled soundfont is missing; "
                         "set demo_corpus.soundfont to a .sf2 file")
    return path


def fluidsynth_binary() -> str:
    path = shutil.which("fluidsynth")
    if path is None:
        raise InputError("fluidsynth not found on PATH; "
                         "install it (apt-get install --no-install-recommends fluidsynth)")
    return path


def render_midi(midi_path: str | Path, soundfont: str | Path, *, sample_rate: int, timeout_s: float,
                max_bytes: int) -> np.ndarray:
    """Render a MIDI file to float32 audio of shape [2, n_samples] (fluidsynth always renders stereo).

    Raises RenderError when fluidsynth fails, runs longer than `timeout_s` seconds of wall-clock time,
    or writes more than `max_bytes` of audio (float32 WAV: 352,800 bytes per second at 44.1 kHz).
    """
    midi_path, soundfont = Path(midi_path), Path(soundfont)
    if not midi_path.is_file():
        raise InputError(f"{midi_path}: MIDI file not found")
    if not soundfont.is_file():
        raise InputError(f"{soundfont}: soundfont not found")
    with tempfile.TemporaryDirectory(prefix="presto-render-") as tmp:
        wav, log = Path(tmp) / "render.wav", Path(tmp) / "fluidsynth.log"
        # -n -i: no MIDI input driver, no interactive shell; -F: render to a file as fast as possible.
        # float output, so that dense passages cannot clip before we normalise.
        command = [fluidsynth_binary(), "-n", "-i", "-q", "-F", str(wav), "-T", "wav", "-O", "float",
                   "-r", str(sample_rate), str(soundfont), str(midi_path)]
        with open(log, "wb") as log_file:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT)
            try:
                _watch(process, wav, midi_path, timeout_s, max_bytes)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        if process.returncode != 0 or not wav.is_file():
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RenderError(f"{midi_path.name}: fluidsynth exited with status {process.returncode}: "
                              f"{' | '.join(tail) or 'no output'}")
        audio, rate = sf.read(str(wav), dtype="float32", always_2d=True)
    if rate != sample_rate:
        raise RenderError(f"{midi_path.name}: fluidsynth wrote {rate} Hz audio, asked for {sample_rate} Hz")
    return np.ascontiguousarray(audio.T)


def _watch(process: subprocess.Popen, wav: Path, midi_path: Path, timeout_s: float, max_bytes: int) -> None:
    """Wait for fluidsynth, raising RenderError (the caller kills it) past the time or size limit."""
    start = time.monotonic()
    while True:
        finished = process.poll() is not None
        size = wav.stat().st_size if wav.exists() else 0
        if size > max_bytes:
            raise RenderError(f"{midi_path.name}: render killed after writing {size / 1e6:.1f} MB, over the "
                              f"{max_bytes / 1e6:.1f} MB limit (a note that never ends?)")
        if finished:
            return
        if time.monotonic() - start > timeout_s:
            raise RenderError(f"{midi_path.name}: render killed after {timeout_s:g} s, its time limit "
                              "(a note that never ends?)")
        time.sleep(POLL_SECONDS)


def trim_trailing_silence(audio: np.ndarray, sample_rate: int, *, floor_db: float,
                          keep_seconds: float) -> np.ndarray:
    """Cut what follows the last sample louder than `floor_db` dB below the peak, keeping `keep_seconds`.

    The synthesiser keeps rendering reverb and release tails (and, for some files, seconds of nothing)
    after the last note; below about -60 dB of the peak that is inaudible. `audio` is [..., n_samples].
    """
    if floor_db >= 0:
        raise ValueError(f"floor_db must be negative (dB below the peak), got {floor_db}")
    envelope = np.abs(audio).reshape(-1, audio.shape[-1]).max(axis=0)
    peak = float(envelope.max(initial=0.0))
    if peak == 0.0:
        return audio[..., :0]
    loud = np.flatnonzero(envelope > peak * 10.0 ** (floor_db / 20.0))
    end = min(audio.shape[-1], int(loud[-1]) + 1 + int(round(keep_seconds * sample_rate)))
    return audio[..., :end]
