"""report.html: one page on which a person listens to every model side by side and reads the numbers.

The page is self-contained and works offline: inline CSS, no scripts, audio (Ogg Vorbis, or 16-bit WAV
where libsndfile lacks Vorbis) and pictures (PNG) embedded as base64 data: URIs, so it can be mailed,
opened from MLflow's artifact view or from disk. Every piece of text that reaches the page goes through
html.escape: prompts come from captions, and captions from metadata, which may hold anything.

A clip is mono [samples] or stereo [2, samples] (left, right): a stereo clip plays in stereo, and its
spectrogram shows the left channel above the right on one scale, so panning shows as a brightness difference.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf

from presto.audio.plots import log_mel_db

SPECTROGRAM_MELS = 64  # enough rows to see pitch and rhythm in a 240-pixel-wide thumbnail


def _data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def encode_audio(audio: np.ndarray, sample_rate: int) -> tuple[str, bytes]:
    """(MIME type, bytes) of a clip [samples] or [2, samples]: Ogg Vorbis (~15x smaller than WAV), 16-bit WAV
    if that fails."""
    clip = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0).T  # soundfile wants [samples, channels]
    buf = io.BytesIO()
    try:
        sf.write(buf, clip, sample_rate, format="OGG", subtype="VORBIS")
        return "audio/ogg", buf.getvalue()
    except (sf.LibsndfileError, RuntimeError, ValueError):  # a libsndfile built without Vorbis
        buf = io.BytesIO()
        sf.write(buf, clip, sample_rate, format="WAV", subtype="PCM_16")
        return "audio/wav", buf.getvalue()


def audio_data_uri(audio: np.ndarray, sample_rate: int) -> str:
    return _data_uri(*encode_audio(audio, sample_rate))


def spectrogram_png(audio: np.ndarray, sample_rate: int) -> bytes:
    """A log-mel spectrogram (dB below the clip's peak, -80..0, low frequencies at the bottom) as a PNG with
    one pixel per frame and mel band: no axes, made for a thumbnail beside an audio player. Of a stereo clip,
    the left channel's above the right's."""
    from matplotlib import image

    buf = io.BytesIO()
    db = log_mel_db(np.asarray(audio, dtype=np.float32), sample_rate, n_mels=SPECTROGRAM_MELS)
    if db.ndim == 3:
        left, right = db
        db = np.concatenate([right, left])  # origin="lower": the first rows are drawn at the bottom
    image.imsave(buf, db, cmap="magma", vmin=-80.0, vmax=0.0, origin="lower", format="png")
    return buf.getvalue()


def line_plot(series: Mapping[str, Sequence[tuple[float, float, str]]], *, x_label: str, y_label: str,
              title: str, log_x: bool) -> bytes:
    """A PNG with one line per series through points (x, y), each point labelled with its text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, points in series.items():
        points = sorted((x, y, text) for x, y, text in points if y is not None and np.isfinite(y))
        if not points:
            continue
        xs, ys, texts = zip(*points)
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, text in points:
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


@dataclass(frozen=True)
class Table:
    """Numbers under a heading: a row per mapping, a column per key in `columns` (a missing value shows as a
    dash)."""

    heading: str
    columns: Sequence[str]
    rows: Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class ListenRow:
    """One row of a listening grid: its label (a prompt, a clip id), a line of details, and a clip per column
    (a column without one stays empty)."""

    label: str
    details: str
    clips: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class ListenGrid:
    """Clips to listen to side by side under a heading and a note; `first` heads the column of row labels."""

    heading: str
    note: str
    first: str
    columns: Sequence[str]
    rows: Sequence[ListenRow]


def _format(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return "&ndash;" if not np.isfinite(value) else html.escape(f"{float(value):.4g}")
    return html.escape(str(value))


def _table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_format(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(audio: np.ndarray | None, sample_rate: int, label: str) -> str:
    if audio is None:
        return "<td></td>"
    stereo = np.ndim(audio) == 2
    alt = html.escape(f"log-mel spectrogram of {label}" + (", left channel above right" if stereo else ""))
    png = _data_uri("image/png", spectrogram_png(audio, sample_rate))
    return (f'<td><img class="spec{" stereo" if stereo else ""}" alt="{alt}" src="{png}">'
            f'<audio controls preload="none" src="{audio_data_uri(audio, sample_rate)}"></audio></td>')


def _grid(grid: ListenGrid, sample_rate: int) -> str:
    head = f"<th>{html.escape(grid.first)}</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in grid.columns)
    rows = []
    for row in grid.rows:
        cells = "".join(_cell(row.clips.get(c), sample_rate, c) for c in grid.columns)
        rows.append(f'<tr><td class="prompt">{html.escape(row.label)}'
                    f'<div class="details">{html.escape(row.details)}</div></td>{cells}</tr>')
    note = f'<p class="note">{html.escape(grid.note)}</p>' if grid.note else ""
    return (f"<h2>{html.escape(grid.heading)}</h2>{note}"
            f'<div class="scroll"><table class="listen"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
p.note { color: #555; font-size: 0.9em; max-width: 70em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics td:first-child { text-align: left; }
div.scroll { overflow-x: auto; }
td.prompt { min-width: 16em; max-width: 22em; }
div.details { color: #666; font-size: 0.85em; margin-top: 0.3em; }
img.spec { display: block; width: 240px; height: 80px; image-rendering: pixelated; }
img.spec.stereo { height: 120px; }
audio { width: 240px; height: 32px; }
figure { display: inline-block; margin: 0 1em 1em 0; }
figcaption { font-size: 0.85em; color: #555; }
"""


def render_report(*, title: str, notes: Sequence[str], tables: Sequence[Table], plots: Sequence[tuple[str, bytes]],
                  grids: Sequence[ListenGrid], sample_rate: int) -> str:
    """The whole page: notes, the tables, the plots (PNG), then the listening grids, each a row per label with
    one clip and its spectrogram per column."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    for table in tables:
        parts.append(f"<h2>{html.escape(table.heading)}</h2>")
        parts.append(f'<div class="scroll">{_table(table.columns, table.rows)}</div>')
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f'<figure><img alt="{html.escape(caption)}" src="{_data_uri("image/png", png)}">'
                  f"<figcaption>{html.escape(caption)}</figcaption></figure>" for caption, png in plots]
    parts += [_grid(grid, sample_rate) for grid in grids]
    parts.append("</body></html>\n")
    return "\n".join(parts)
