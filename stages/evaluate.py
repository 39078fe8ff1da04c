"""evaluate: every model at every setting worth comparing, scored against the test split; a listening
report; the models registered for serving.

Each run of params `evaluate.runs` is a model (the out folder of a stage: train_dit, presto_l, ase, presto_s,
presto_ls) and a SamplingRecipe. For each, the stage generates one clip per prompt and seed (prompts:
captions of test clips spread over the test split) and scores the clips against real test clips cropped to
the same length:

  quality  fad, mmd (unbiased, RBF bandwidth `mmd_bandwidth`, x1000), density, recall, coverage (k = prdc_k)
           on the configured audio embedding (presto/eval/embedders.py, presto/eval/metrics.py);
           fad_std, the FAD's spread over `fad_bootstrap` resamples of the prompts, and fad_vs_reference,
           the FAD minus the reference run's, with the spread of that difference over the same resamples
           of both sets (paired: it is what says whether one model beats another on these prompts)
  text     clap_score (CLAP embedder only, else null); tempo_error, key_accuracy, key_mirex of the audio
           against the tempo and key its prompt states (presto/eval/adherence.py)
  speed    nfe (CFG counts 2 per step); latency_ms at batch 1: warm, the median of `latency_repeats` runs,
           text encoding + sampling + VAE decode, broken down as latency_{text,sample,decode}_ms;
           rtf = seconds of audio per second of latency (the paper's convention: 32 s in 43.34 s is 0.74);
           speedup_vs_base, how many times faster than `reference_run` the run is: each run takes turns with
           the reference run for `latency_repeats` rounds, and this is the median of the rounds' ratios
           (reference / run), so a load that changes between rounds (another process on the machine) moves
           both sides of each ratio; speedup_vs_base_std, that median's standard error; reference_latency_ms,
           the reference run's median over those rounds; upmix_ms, the upmixer's time for the same seconds
           (warm, median of as many runs), and latency_stereo_ms = latency_ms + upmix_ms

Stereo (the train_stereo upmixer, which every model is registered and served with): the real stereo clips
among the reference clips, upmixed from their downmix, against the real ones, beside dual mono (side = 0):
side and channel STFT distances, inter-channel correlation and width with their errors, and the FAD of the
side signals (presto/eval/stereo.py); and the served model's clips upmixed, which no real clip pairs with:
their correlation, width and side-signal FAD against the real stereo clips.

Options (the paper's extra analyses): best of N (each prompt gets N candidates, as many as fit a latency
budget, and keeps the one with the best CLAP score, or without CLAP the best tempo/key adherence; its
latency counts generating and scoring all N), and a sweep of the step schedule's rho for one run.

Out (artifacts/evaluate): metrics.json ({name: {steps: {...}}}, best-of-N runs as <name>_best_of_n),
stereo.json (the stereo scores: {"upmixer": {...}, "dual_mono": {...}, "real": {...}, "served": {...}}),
comparisons.json (per pair of `compare`, keyed "<a> vs <b>": fad_diff = FAD(a) - FAD(b) with its paired
bootstrap spread, and latency_ratio = latency(a) / latency(b) with its standard error, the two runs timed taking
turns with each other for `compare_latency_repeats` rounds, the median of the rounds' ratios; also in the report
and the tracker as compare.<a> vs <b>.*). stereo.json and comparisons.json are DVC metrics beside metrics.json,
so `dvc exp show` lists the paired differences of each experiment (a fine-tune seed, a schedule). The DVC plots
quality_vs_latency.json, fad_vs_steps.json, fad_vs_rho.json, and report.html (with the served
model's clips upmixed, and real stereo test clips beside their upmix and their mono downmix). The report
and plots go to the tracker, and every model is registered there (presto-<name>, with its best run's recipe,
and the upmixer for stereo requests); the alias `best` marks the model to serve: Presto-LS when evaluated,
else the lowest-FAD model.

Resumption: each generated set of clips, and each run's timings, are saved to ctx.checkpoint_dir as soon
as they exist; a rerun after a crash loads them instead of generating or timing again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from presto.config import EvalRun, EvaluateParams
from presto.data.latents import LATENT_STATS, TEXT_ENCODER
from presto.data.shards import MANIFEST, ShardReader, read_manifest
from presto.errors import InputError, ParamsError
from presto.eval import adherence, metrics
from presto.eval.adherence import Measured, Target
from presto.eval.stereo import channel_correlation, side_embeddings, stereo_comparison, stereo_width
from presto.eval.timing import paired_ratio, take_turns
from presto.distill.presto_l import SCHEDULE_FILE
from presto.generation import EDM_FILE, MODEL_DIR, Generator, SamplingRecipe
from presto.models.upmixer import INFO_FILE as UPMIXER_INFO
from presto.models.upmixer import MODEL_DIR as UPMIXER_MODEL
from presto.models.upmixer import Upmixer, load_upmixer, upmix
from presto.training.progress import Progress
from stages.base import StageContext
from stages.runner import _check_metrics, flatten_metrics, write_json
from stages.caption import CAPTIONS
from stages.train_dit import VAE_MODEL
from stages.train_stereo import stereo_clip

REPORT = "report.html"
STEREO_FILE = "stereo.json"  # the stereo scores: not per model and step count, so not in metrics.json
COMPARE_FILE = "comparisons.json"  # the paired differences of `compare`: {"a vs b": {fad_diff, ...}}
PLOT_QUALITY = "quality_vs_latency.json"
PLOT_STEPS = "fad_vs_steps.json"
PLOT_RHO = "fad_vs_rho.json"
LATENCY_FILE = "latency.json"  # in the checkpoint folder: {run label: the reference's (a) and its (b) rounds}
COMPARE_LATENCY_FILE = "compare_latency.json"  # in the checkpoint folder: {"a vs b": both runs' timed rounds}
BEST_ALIAS = "best"
# Candidate j of a clip with seed s has seed s + j * stride: candidate 0 is the run's own clip, and the
# candidates of different seeds never share a seed (for fewer than `stride` seeds).
CANDIDATE_SEED_STRIDE = 100_003
BOOTSTRAP_SEED = 0
QUALITY_KEYS = ("fad", "fad_std", "fad_vs_reference", "fad_vs_reference_std", "mmd", "density", "recall",
                "coverage", "clap_score", "tempo_error", "key_accuracy", "key_mirex")
TABLE_KEYS = QUALITY_KEYS + ("nfe", "latency_ms", "latency_stereo_ms", "latency_text_ms", "latency_sample_ms",
                             "latency_decode_ms", "rtf", "speedup_vs_base", "speedup_vs_base_std")
# stereo.json: these for the upmixer and for dual mono, each with side_fad
STEREO_KEYS = ("side_stft_distance", "channel_stft_distance", "correlation", "correlation_error", "width",
               "width_error")
# comparisons.json: these for each compared pair
COMPARE_KEYS = ("fad_a", "fad_b", "fad_diff", "fad_diff_std", "latency_ratio", "latency_ratio_std")


# ---- the models -----------------------------------------------------------------------------------------


def model_files(root: Path, stage: str) -> dict[str, Path]:
    """The files of a model bundle in the project: the stage's model folder, the VAE, the encode stage's
    latent statistics and text encoder, the upmixer's folder."""
    encode = root / "artifacts" / "encode"
    return {"model_dir": root / "artifacts" / stage, "vae": root / "artifacts" / "train_vae" / VAE_MODEL,
            "latent_stats": encode / LATENT_STATS, "text_encoder": encode / TEXT_ENCODER,
            "upmixer": root / "artifacts" / "train_stereo"}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # free on one filesystem, and the weights are never modified in place
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def bundle(root: Path, stage: str) -> Iterator[dict[str, Path]]:
    """The bundle as four folders, {model, vae, encode, upmixer}, holding only what generation reads (valid
    inside the `with`): what a registered model carries. Files are hard links where possible (MLflow copies
    them, and refuses symlinks out of the folder), in a scratch folder beside the project's run records."""
    files = model_files(root, stage)
    scratch = root / ".presto"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bundle-", dir=scratch) as tmp:
        model, encode, upmixer = Path(tmp) / "model", Path(tmp) / "encode", Path(tmp) / "upmixer"
        encode.mkdir()
        shutil.copytree(files["model_dir"] / MODEL_DIR, model / MODEL_DIR, copy_function=_link_or_copy)
        for name in (EDM_FILE, SCHEDULE_FILE):
            if (files["model_dir"] / name).is_file():
                _link_or_copy(str(files["model_dir"] / name), str(model / name))
        for name in ("latent_stats", "text_encoder"):
            _link_or_copy(str(files[name]), str(encode / files[name].name))
        shutil.copytree(files["upmixer"] / UPMIXER_MODEL, upmixer / UPMIXER_MODEL, copy_function=_link_or_copy)
        _link_or_copy(str(files["upmixer"] / UPMIXER_INFO), str(upmixer / UPMIXER_INFO))
        yield {"model": model, "vae": files["vae"], "encode": encode, "upmixer": upmixer}


# ---- the test set ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """Prompts (one per chosen test clip) with what they ask for, and the real clips to compare with."""

    clip_ids: list[str]  # the test clip each prompt describes
    prompts: list[str]
    targets: list[Target]
    prompt_audio: np.ndarray  # [prompts, samples]: the clip each prompt describes (for the report)
    reference: np.ndarray  # [clips, samples]: the real set of the distribution metrics
    stereo_ids: list[str]  # the reference clips with a stereo original (prepare keeps those of stereo sources)
    stereo: np.ndarray  # [stereo clips, 2, samples]: their stereo originals
    sample_rate: int


def spread(items: Sequence[Any], count: int) -> list[Any]:
    """`count` items evenly spread over the sequence, first and last included (all of them if fewer)."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def choose_prompt(captions: Sequence[str]) -> str:
    """The clip's caption that states the most of tempo and key (so adherence can be measured), the first
    one on ties."""
    def stated(caption: str) -> int:
        target = adherence.prompt_target(caption)
        return (target.tempo is not None) + (target.key is not None)

    return max(captions, key=stated)  # max keeps the first of equals


def load_test_set(root: Path, p: EvaluateParams) -> EvalSet:
    manifest_path = root / "artifacts" / "prepare" / MANIFEST
    captions_path = root / "artifacts" / "caption" / CAPTIONS
    for path, stage in ((manifest_path, "prepare"), (captions_path, "caption")):
        if not path.is_file():
            raise InputError(f"{path}: not found; run the {stage} stage first")
    rows = [r for r in read_manifest(manifest_path) if r["split"] == "test" and float(r["seconds"]) >= p.seconds]
    if not rows:
        raise InputError(f"{manifest_path}: no test clip is at least evaluate.seconds = {p.seconds} s long")
    rates = {int(r["sample_rate"]) for r in rows}
    if len(rates) != 1:
        raise InputError(f"{manifest_path}: test clips at several sample rates {sorted(rates)}")
    captions = {c["clip_id"]: c["captions"] for c in read_manifest(captions_path) if c.get("captions")}
    captioned = [r for r in rows if r["clip_id"] in captions]
    if len(captioned) < p.n_prompts:
        raise InputError(f"{captions_path}: {len(captioned)} captioned test clips of at least {p.seconds} s, "
                         f"fewer than evaluate.n_prompts = {p.n_prompts}")
    reference_rows = spread(rows, p.reference_clips)
    if len(reference_rows) <= p.prdc_k:
        raise InputError(f"{manifest_path}: {len(reference_rows)} test clips of at least {p.seconds} s; "
                         f"density/recall/coverage with evaluate.prdc_k = {p.prdc_k} need more than k")
    (sample_rate,) = rates
    samples = round(p.seconds * sample_rate)
    reader = ShardReader(root / "artifacts")

    def clip(row: dict[str, Any]) -> np.ndarray:
        return np.atleast_2d(reader.clip(row)).mean(axis=0)[:samples]

    prompt_rows = spread(captioned, p.n_prompts)
    prompts = [choose_prompt(captions[r["clip_id"]]) for r in prompt_rows]
    stereo_rows = [r for r in reference_rows if "stereo_shard" in r]
    stereo = np.zeros((len(stereo_rows), 2, samples), dtype=np.float32)
    for k, row in enumerate(stereo_rows):
        stereo[k] = stereo_clip(reader, row)[:, :samples]
    return EvalSet(clip_ids=[r["clip_id"] for r in prompt_rows], prompts=prompts,
                   targets=[adherence.prompt_target(t) for t in prompts],
                   prompt_audio=np.stack([clip(r) for r in prompt_rows]),
                   reference=np.stack([clip(r) for r in reference_rows]),
                   stereo_ids=[r["clip_id"] for r in stereo_rows], stereo=stereo, sample_rate=sample_rate)


# ---- scores ---------------------------------------------------------------------------------------------


def make_embedder(p: EvaluateParams, device: torch.device):
    from presto.eval.embedders import ClapEmbedder, CrepeSpectralEmbedder

    e = p.embedder
    if e.kind == "clap":
        return ClapEmbedder(e.checkpoint, e.audio_model, e.enable_fusion, device=str(device))
    return CrepeSpectralEmbedder()


class Scorer:
    """Scores a set of clips, ordered prompt by prompt and seed by seed, against the test set."""

    def __init__(self, embedder: Any, test: EvalSet, reference_embeddings: np.ndarray, seeds: int,
                 p: EvaluateParams):
        self.embedder, self.test, self.seeds, self.p = embedder, test, seeds, p
        self.reference = reference_embeddings
        self.frechet = metrics.FrechetToReference(reference_embeddings)
        self.draws: np.ndarray | None = None  # bootstrap draws of clip indices, shared by every scored set
        self.baseline_fads: np.ndarray | None = None  # the reference run's FAD on each draw
        self.baseline_fad = math.nan  # and on its clips
        self.draw_fads: dict[str, np.ndarray] = {}  # per run label: its FAD on each draw (for `compare`)
        self.embedded: dict[str, np.ndarray] = {}  # per run label: its clips' embeddings, computed once
        self.targets = [t for t in test.targets for _ in range(seeds)]
        text_embed = getattr(embedder, "text_embed", None)
        self.text = np.repeat(text_embed(test.prompts), seeds, axis=0) if text_embed else None
        self.score_ms = math.nan  # time per clip of the best-of-N selection score, measured on first use

    def measure(self, audio: np.ndarray) -> list[Measured]:
        return [adherence.measure(clip, self.test.sample_rate) for clip in audio]

    def selection_scores(self, audio: np.ndarray) -> np.ndarray:
        """Per clip, the score best of N keeps the highest: the CLAP text-audio cosine when CLAP is the
        embedder, else the tempo/key adherence (NaN where the prompt states neither)."""
        start = time.perf_counter()
        if self.text is not None:
            emb = self.embedder.embed(audio, self.test.sample_rate)
            norms = np.linalg.norm(emb, axis=1) * np.linalg.norm(self.text, axis=1)
            out = np.einsum("nd,nd->n", emb, self.text) / norms
        else:
            scores = [adherence.adherence_score(t, m) for t, m in zip(self.targets, self.measure(audio))]
            out = np.array([np.nan if s is None else s for s in scores])
        if math.isnan(self.score_ms):
            self.score_ms = 1e3 * (time.perf_counter() - start) / len(audio)
        return out

    def embed(self, audio: np.ndarray, label: str | None) -> np.ndarray:
        if label is None:
            return self.embedder.embed(audio, self.test.sample_rate)
        if label not in self.embedded:
            self.embedded[label] = self.embedder.embed(audio, self.test.sample_rate)
        return self.embedded[label]

    def set_baseline(self, audio: np.ndarray, label: str) -> None:
        """The reference run's clips: every set scored after this gets its FAD's bootstrap spread and its
        paired FAD difference to these (the same prompts and seeds resampled for both: the noise that the
        choice of prompts adds to a comparison of two models, which the real clips' own sampling does not
        enter since every set is scored against the same ones)."""
        if self.p.fad_bootstrap == 0:
            return
        emb = self.embed(audio, label)
        self.draws = metrics.bootstrap_draws(len(emb), self.p.fad_bootstrap, seed=BOOTSTRAP_SEED)
        self.baseline_fads = np.array([self.frechet(emb[d]) for d in self.draws])
        self.baseline_fad = self.frechet(emb)

    def fad_spread(self, emb: np.ndarray, label: str | None) -> dict[str, float | None]:
        if self.draws is None or len(emb) != self.draws.shape[1]:
            return {"fad_std": None, "fad_vs_reference": None, "fad_vs_reference_std": None}
        fads = np.array([self.frechet(emb[d]) for d in self.draws])
        if label is not None:
            self.draw_fads[label] = fads
        return {"fad_std": float(fads.std(ddof=1)), "fad_vs_reference": self.frechet(emb) - self.baseline_fad,
                "fad_vs_reference_std": float((fads - self.baseline_fads).std(ddof=1))}

    def score(self, audio: np.ndarray, label: str | None = None) -> dict[str, float | None]:
        """The quality and adherence scores of a set of clips; `label` (a run's) keeps its bootstrap FADs for
        the paired comparisons of `compare`."""
        emb = self.embed(audio, label)
        measured = self.measure(audio)
        prdc = metrics.prdc(self.reference, emb, k=self.p.prdc_k)
        return {
            "fad": metrics.frechet_distance(self.reference, emb), **self.fad_spread(emb, label),
            "mmd": metrics.mmd(self.reference, emb, bandwidth=self.p.mmd_bandwidth),
            "density": prdc["density"], "recall": prdc["recall"], "coverage": prdc["coverage"],
            "clap_score": metrics.clap_score(emb, self.text) if self.text is not None else None,
            "tempo_error": adherence.tempo_error(self.targets, measured),
            "key_accuracy": adherence.key_accuracy(self.targets, measured),
            "key_mirex": adherence.key_mirex(self.targets, measured),
        }


# ---- generation -----------------------------------------------------------------------------------------


def cached(folder: Path, key: str, make: Callable[[], tuple[np.ndarray, dict[str, float]]]
           ) -> tuple[np.ndarray, dict[str, float]]:
    """`make()` once: its array and numbers are saved under `key` in `folder` and read back on a rerun."""
    path = folder / f"{key.replace('/', '-')}.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor("array"), json.loads(f.metadata()["info"])
    array, info = make()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"array": np.ascontiguousarray(array)}, str(tmp), metadata={"info": json.dumps(info)})
    tmp.replace(path)
    return array, info


def generate_set(generator: Generator, prompts: Sequence[str], seeds: Sequence[int], seconds: float,
                 recipe: SamplingRecipe, batch: int, label: str) -> tuple[np.ndarray, dict[str, float]]:
    """A clip per (prompt, seed), prompt-major, in batches; and the NFE of one clip."""
    items = [(prompt, seed) for prompt in prompts for seed in seeds]
    clips, nfe = [], 0.0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        audio, timings = generator.generate([t for t, _ in chunk], seconds, [s for _, s in chunk], recipe)
        if not np.isfinite(audio).all():
            raise InputError(f"evaluate {label}: the model generates NaN/Inf audio ({recipe.sampler}, "
                             f"{recipe.steps} steps): it diverged in training, or the recipe does not suit it")
        clips.append(audio)
        nfe = timings["nfe"]
    return np.concatenate(clips), {"nfe": nfe}


def latency_call(generator: Generator, prompt: str, seed: int, seconds: float, recipe: SamplingRecipe
                 ) -> Callable[[], dict[str, float]]:
    """One batch-1 generation, timed in total and per component (its generator's timings). Every call encodes
    its prompt (the text cache is emptied first): a served prompt is usually new."""

    def call() -> dict[str, float]:
        generator.text_encoder.clear()
        return generator.generate([prompt], seconds, [seed], recipe)[1]
    return call


def median_latency(timings: Sequence[dict[str, float]]) -> dict[str, float]:
    """latency_ms and latency_{text,sample,decode}_ms: the medians over timed calls."""
    return {f"latency_{part}_ms": float(np.median([t[f"{part}_ms"] for t in timings]))
            for part in ("text", "sample", "decode")} | {
        "latency_ms": float(np.median([t["total_ms"] for t in timings]))}


def upmix_all(upmixer: Upmixer, mono: np.ndarray, batch: int) -> np.ndarray:
    """Stereo [clips, 2, samples] of mono clips [clips, samples], `batch` clips at a time."""
    return np.concatenate([upmix(upmixer, mono[i:i + batch])[0] for i in range(0, len(mono), batch)])


def measure_upmix(upmixer: Upmixer, clip: np.ndarray, repeats: int) -> float:
    """Batch-1 upmix time (ms) of a mono clip [1, samples] after one warm-up call: the median of `repeats`."""
    upmix(upmixer, clip)
    return float(np.median([upmix(upmixer, clip)[1] for _ in range(repeats)]))


@dataclass(frozen=True)
class Timed:
    """A run's batch-1 speed, from the rounds it took turns with the reference run."""
    latency: dict[str, float]  # latency_ms and latency_{text,sample,decode}_ms: medians over the rounds
    reference_ms: float  # the reference run's median over the same rounds
    speedup: float  # the median of the rounds' ratios reference / run (paired_ratio)
    speedup_std: float | None  # its standard error; None from one round

    def slower(self, latency: dict[str, float]) -> Timed:
        """The same rounds, had each generation taken `latency` instead (best of N: N candidates and their
        scoring): the speed-up shrinks by the ratio of the two latencies and keeps its relative error."""
        scale = self.latency["latency_ms"] / latency["latency_ms"]
        return Timed(latency, self.reference_ms, self.speedup * scale,
                     None if self.speedup_std is None else self.speedup_std * scale)


def speed(timed: Timed, nfe: float, seconds: float, upmix_ms: float) -> dict[str, float | None]:
    """A run's speed numbers."""
    return timed.latency | {"nfe": nfe, "rtf": seconds / (timed.latency["latency_ms"] / 1e3),
                            "reference_latency_ms": timed.reference_ms, "speedup_vs_base": timed.speedup,
                            "speedup_vs_base_std": timed.speedup_std, "upmix_ms": upmix_ms,
                            "latency_stereo_ms": timed.latency["latency_ms"] + upmix_ms}


# ---- stereo ---------------------------------------------------------------------------------------------


def check_stereo_params(p: EvaluateParams, sample_rate: int) -> None:
    samples = round(p.seconds * sample_rate)
    if max(p.stereo.stft_fft_sizes) > samples:
        raise ParamsError(f"evaluate.stereo.stft_fft_sizes: {max(p.stereo.stft_fft_sizes)} samples is longer than "
                          f"the evaluate.seconds = {p.seconds} clips ({samples} samples at {sample_rate} Hz)")


def side_fad(embedder: Any, real_sides: np.ndarray | None, stereo: np.ndarray, sample_rate: int) -> float | None:
    """FAD of the side signals of `stereo` [clips, 2, samples] against the real stereo clips' side embeddings;
    None without two clips on each side (a covariance needs two)."""
    if real_sides is None or len(stereo) < 2:
        return None
    return metrics.frechet_distance(real_sides, side_embeddings(embedder, stereo, sample_rate))


def score_stereo(upmixer: Upmixer, embedder: Any, real_sides: np.ndarray | None, test: EvalSet,
                 p: EvaluateParams) -> tuple[dict[str, dict[str, float | None]], np.ndarray]:
    """The upmixer on the downmix of each real stereo test clip, against the real clip, beside dual mono
    (side = 0): the upmixer, dual_mono and real parts of stereo.json, and the upmixed clips
    [stereo clips, 2, samples]. Without stereo test clips every score is None."""
    real, fft_sizes = test.stereo, p.stereo.stft_fft_sizes
    if not len(real):
        unscored = dict.fromkeys(STEREO_KEYS + ("side_fad",))
        real_entry = {"correlation": None, "width": None, "clips": 0}
        return {"upmixer": unscored, "dual_mono": dict(unscored), "real": real_entry}, real
    mid = real.mean(axis=1)  # the downmix (L + R) / 2
    upmixed = upmix_all(upmixer, mid, p.batch)
    batches = []  # (clips, their stereo_comparison)
    for i in range(0, len(real), p.batch):
        pred, true = torch.from_numpy(upmixed[i:i + p.batch]), torch.from_numpy(real[i:i + p.batch])
        batches.append((len(true), stereo_comparison(pred, true, fft_sizes)))
    # Every score is a mean over clips of one length: batch means weighted by batch size are the overall mean.
    scores = {k: sum(n * b[k] for n, b in batches) / len(real) for k in batches[0][1]}
    dual_mono = np.stack([mid, mid], axis=1)
    entry = {"upmixer": {k: scores[f"upmix_{k}"] for k in STEREO_KEYS}
             | {"side_fad": side_fad(embedder, real_sides, upmixed, test.sample_rate)},
             "dual_mono": {k: scores[f"dual_mono_{k}"] for k in STEREO_KEYS}
             | {"side_fad": side_fad(embedder, real_sides, dual_mono, test.sample_rate)},
             "real": {"correlation": scores["real_correlation"], "width": scores["real_width"], "clips": len(real)}}
    return entry, upmixed


def score_generated_stereo(stereo: np.ndarray, embedder: Any, real_sides: np.ndarray | None,
                           sample_rate: int) -> dict[str, float | None]:
    """Generated clips upmixed [clips, 2, samples], which no real clip pairs with: their mean correlation and
    width (to read beside the real clips') and the FAD of their side signals against the real ones."""
    clips = torch.from_numpy(stereo)
    return {"correlation": channel_correlation(clips).mean().item(), "width": stereo_width(clips).mean().item(),
            "side_fad": side_fad(embedder, real_sides, stereo, sample_rate)}


# ---- outputs --------------------------------------------------------------------------------------------


def best_run_of(entries: dict[str, dict[str, Any]]) -> str:
    """The step count (key) whose FAD is lowest; fewer steps on ties, and runs without a FAD last."""
    return min(entries, key=lambda s: (entries[s]["fad"] is None, entries[s]["fad"] or 0.0, int(s)))


def plot_records(results: dict[str, dict[str, dict[str, Any]]]) -> tuple[list[dict], list[dict]]:
    quality, steps = [], []
    for name, by_steps in results.items():
        for s, entry in by_steps.items():
            quality.append({"label": f"{name}/{s}", "model": name, "steps": int(s), "latency_ms": entry["latency_ms"],
                            "fad": entry["fad"], "mmd": entry["mmd"], "nfe": entry["nfe"]})
            steps.append({"model": name, "steps": int(s), "fad": entry["fad"], "nfe": entry["nfe"]})
    return quality, steps


@dataclass(frozen=True)
class StereoReport:
    """What the report shows of stereo: the served run's clip per prompt upmixed, the stereo scores (stereo.json),
    and the real stereo test clips' upmix."""

    served: str  # label of the served model's run
    served_clips: np.ndarray  # [prompts, 2, samples]
    scores: dict[str, dict[str, float | None]]  # {upmixer, dual_mono, real, served}
    upmixed: np.ndarray  # [stereo clips, 2, samples], as EvalSet.stereo


def stereo_listen_rows(test: EvalSet, upmixed: np.ndarray, count: int) -> list[Any]:
    """Up to `count` real stereo test clips (spread over them), each beside its upmix and its mono downmix."""
    from presto.eval.report import ListenRow

    rows = []
    for k in spread(range(len(test.stereo)), count):
        pair = torch.from_numpy(np.stack([test.stereo[k], upmixed[k]]))
        (corr_real, corr_up), (width_real, width_up) = channel_correlation(pair).tolist(), stereo_width(pair).tolist()
        rows.append(ListenRow(
            label=f"test clip {test.stereo_ids[k]}",
            details=f"correlation {corr_real:.2f} real, {corr_up:.2f} upmixed; width {width_real:.3f} real, "
                    f"{width_up:.3f} upmixed",
            clips={"real stereo": test.stereo[k], "upmixed from mono": upmixed[k],
                   "mono (the upmixer's input)": test.stereo[k].mean(axis=0)}))  # the downmix (L + R) / 2
    return rows


def write_report(path: Path, *, test: EvalSet, results: dict[str, dict[str, dict[str, Any]]],
                 clips: dict[str, np.ndarray], real_scores: dict[str, float | None], rho_records: list[dict],
                 comparisons: dict[str, dict[str, Any]], notes: list[str], seeds: int, stereo: StereoReport,
                 stereo_listen_clips: int) -> None:
    from presto.eval.report import ListenGrid, ListenRow, Table, line_plot, render_report

    rows = [{"model": f"{name}/{s}", **entry} for name, by_steps in results.items() for s, entry in by_steps.items()]
    rows.append({"model": "real test clips (ceiling of the estimators)", **real_scores})
    stereo_rows = [{"stereo": "upmixer", **stereo.scores["upmixer"]},
                   {"stereo": "dual mono (side = 0)", **stereo.scores["dual_mono"]},
                   {"stereo": "real stereo test clips", **stereo.scores["real"]},
                   {"stereo": f"{stereo.served} generated, upmixed", **stereo.scores["served"]}]
    tables = [Table("Metrics", ["model", *TABLE_KEYS], rows),
              Table("Paired comparisons: FAD(a) - FAD(b), spread over the same resamples of the prompts",
                    ["a vs b", *COMPARE_KEYS], [{"a vs b": key, **entry} for key, entry in comparisons.items()]),
              Table("Stereo: the upmixer against the real stereo test clips", ["stereo", *STEREO_KEYS, "side_fad"],
                    stereo_rows)]
    by_model: dict[str, list[tuple[float, float, str]]] = {}
    for name, by_steps in results.items():
        by_model[name] = [(e["latency_ms"], e["fad"], f"{s} steps") for s, e in by_steps.items()]
    plots = [("FAD against latency at batch 1 (lower left is better)",
              line_plot(by_model, x_label="latency (ms, batch 1)", y_label="FAD", title="quality vs latency",
                        log_x=True)),
             ("FAD against sampling steps",
              line_plot({n: [(int(s), e["fad"], "") for s, e in b.items()] for n, b in results.items()},
                        x_label="steps", y_label="FAD", title="FAD vs steps", log_x=True))]
    if rho_records:
        plots.append(("FAD against the step schedule's rho",
                      line_plot({"rho sweep": [(r["rho"], r["fad"], f"rho {r['rho']:g}") for r in rho_records]},
                                x_label="rho", y_label="FAD", title="FAD vs rho", log_x=True)))
    served_column = f"{stereo.served} upmixed to stereo"
    columns = ["real", *clips, served_column]
    prompt_rows = []
    for i, (prompt, target) in enumerate(zip(test.prompts, test.targets)):
        asks = ", ".join(x for x in (f"{target.tempo:g} bpm" if target.tempo else "", target.key or "") if x)
        details = f"test clip {test.clip_ids[i]}" + (f"; asks for {asks}" if asks else "")
        audio = ({"real": test.prompt_audio[i]} | {label: a[i * seeds] for label, a in clips.items()}
                 | {served_column: stereo.served_clips[i]})
        prompt_rows.append(ListenRow(label=prompt, details=details, clips=audio))
    grids = [ListenGrid("Listen", "", "prompt", columns, prompt_rows)]
    real_stereo = stereo_listen_rows(test, stereo.upmixed, stereo_listen_clips)
    if real_stereo:
        grids.append(ListenGrid(
            "Listen in stereo: real test clips", "Each real stereo test clip beside the upmixer's stereo made from "
            "its mono downmix, and that mono downmix (use headphones).", "test clip",
            ["real stereo", "upmixed from mono", "mono (the upmixer's input)"], real_stereo))
    html = render_report(title="presto: evaluation on the test split", notes=notes, tables=tables, plots=plots,
                         grids=grids, sample_rate=test.sample_rate)
    path.write_text(html, encoding="utf-8")


# ---- the stage ------------------------------------------------------------------------------------------


def check_runs(ctx: StageContext, runs: Sequence[EvalRun]) -> None:
    """Every run's stage is an upstream of evaluate (so DVC reruns evaluate when it changes) and is built."""
    from stages.specs import get

    upstream = get(ctx.name).upstream
    for i, run in enumerate(runs):
        if run.stage not in upstream:
            raise ParamsError(f"evaluate.runs[{i}].stage = {run.stage!r} is not an upstream of evaluate in "
                              f"stages/specs.py ({', '.join(upstream)}): add it there")
        folder = ctx.upstream(run.stage)
        if not (folder / MODEL_DIR).is_dir() or not (folder / EDM_FILE).is_file():
            raise InputError(f"{folder}: no {MODEL_DIR}/ and {EDM_FILE} for evaluate.runs[{i}] ({run.label}); "
                             f"run the {run.stage} stage first")
        if (folder / SCHEDULE_FILE).is_file() and run.recipe.budgets is not None:
            raise ParamsError(f"evaluate.runs[{i}] ({run.label}): {folder} runs its own layer schedule "
                              f"({SCHEDULE_FILE}); set recipe.budgets to null")


class Models:
    """The models under evaluation and the clips they generate for the test prompts, each set saved to the
    checkpoint folder as soon as it exists and read back on a rerun. Besides the reference run's model (timed
    beside every other), one model is in memory at a time, or the two a comparison times together."""

    def __init__(self, ctx: StageContext, test: EvalSet, device: torch.device, reference_stage: str):
        self.ctx, self.p, self.test, self.device = ctx, ctx.params.evaluate, test, device
        self.reference_stage = reference_stage
        self._loaded: dict[str, Generator] = {}

    def generator(self, stage: str, keep: Sequence[str] = ()) -> Generator:
        """The stage's model, loaded if it is not in memory; models other than the reference's and `keep`'s
        are let go first."""
        if stage not in self._loaded:
            for other in [s for s in self._loaded if s != self.reference_stage and s not in keep]:
                del self._loaded[other]
            files = model_files(self.ctx.root, stage)
            generator = Generator.load(files["model_dir"], vae_dir=files["vae"],
                                       encode_dir=files["latent_stats"].parent, device=self.device)
            if generator.sample_rate != self.test.sample_rate:
                raise InputError(f"{files['latent_stats']}: the model writes {generator.sample_rate} Hz, the test "
                                 f"clips are {self.test.sample_rate} Hz")
            self._loaded[stage] = generator
        return self._loaded[stage]

    def clips(self, key: str, stage: str, recipe: SamplingRecipe, seeds: Sequence[int]
              ) -> tuple[np.ndarray, dict[str, float]]:
        """A clip per prompt and seed, with the NFE of one clip."""
        return cached(self.ctx.checkpoint_dir, key, lambda: generate_set(
            self.generator(stage), self.test.prompts, seeds, self.p.seconds, recipe, self.p.batch, key))

    def run(self, run: EvalRun) -> tuple[np.ndarray, dict[str, float]]:
        """The run's clips (a clip per prompt and seed) and NFE."""
        return self.clips(f"run-{run.label}", run.stage, run.recipe, self.p.seeds)

    def latency_calls(self, runs: Sequence[EvalRun]) -> dict[str, Callable[[], dict[str, float]]]:
        """Per run label, its batch-1 latency call; the runs' models are in memory together."""
        stages = [run.stage for run in runs]
        return {run.label: latency_call(self.generator(run.stage, keep=stages), self.test.prompts[0],
                                        self.p.seeds[0], self.p.seconds, run.recipe) for run in runs}


def timed_rounds(models: Models, pairs: dict[str, tuple[EvalRun, EvalRun]], repeats: int, cache: Path
                 ) -> Iterator[tuple[str, list[dict[str, float]], list[dict[str, float]]]]:
    """For each key of `pairs` (a, b): the key and the timings of a and of b, the two taking turns with each
    other (a warm-up round, dropped, then `repeats` rounds of a, b; a run paired with itself is timed alone).
    Each key's rounds are saved to `cache` as soon as they exist and read back on a rerun."""
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    for key, (a, b) in pairs.items():
        if key not in done:
            timings = take_turns(models.latency_calls([a, b]), 1 + repeats)
            done[key] = {"a": timings[a.label][1:], "b": timings[b.label][1:]}
            write_json(cache, done)
        yield key, done[key]["a"], done[key]["b"]


def totals(rounds: Sequence[dict[str, float]]) -> list[float]:
    """Each timed call's whole latency (ms)."""
    return [t["total_ms"] for t in rounds]


def time_runs(models: Models, runs: Sequence[EvalRun], reference: EvalRun, repeats: int, cache: Path
              ) -> dict[str, Timed]:
    """Per run label, its speed: each run takes turns with the reference run for `repeats` rounds
    (timed_rounds), and its speed-up is the median of the rounds' ratios with its standard error
    (paired_ratio), so that a load that changes from round to round cancels."""
    progress = Progress("evaluate: timing", len(runs), unit="run", every_s=0.0)
    timed = {}
    rounds = timed_rounds(models, {run_.label: (reference, run_) for run_ in runs}, repeats, cache)
    for k, (label, reference_rounds, run_rounds) in enumerate(rounds):
        speedup, speedup_std = paired_ratio(totals(reference_rounds), totals(run_rounds))
        timed[label] = Timed(median_latency(run_rounds), float(np.median(totals(reference_rounds))), speedup,
                             speedup_std)
        progress.update(k + 1, latency_ms=timed[label].latency["latency_ms"], speedup=speedup)
    return timed


def pair_key(a: str, b: str) -> str:
    """How a compared pair of run labels is named in comparisons.json, the tracker and the timing cache."""
    return f"{a} vs {b}"


def time_pairs(models: Models, pairs: Sequence[tuple[EvalRun, EvalRun]], repeats: int, cache: Path
               ) -> dict[str, tuple[float, float | None]]:
    """Per pair (a, b), keyed by pair_key: latency(a) / latency(b) and its standard error
    (presto.eval.timing.paired_ratio), the two taking turns with each other (timed_rounds). Timed directly, not
    each against the reference run: two runs' medians from different rounds differ by the machine's load between
    those rounds as much as by the runs."""
    progress = Progress("evaluate: timing comparisons", len(pairs), unit="pair", every_s=0.0)
    ratios = {}
    rounds = timed_rounds(models, {pair_key(a.label, b.label): (a, b) for a, b in pairs}, repeats, cache)
    for k, (key, a_rounds, b_rounds) in enumerate(rounds):
        ratios[key] = paired_ratio(totals(a_rounds), totals(b_rounds))
        progress.update(k + 1, latency_ratio=ratios[key][0])
    return ratios


def best_of_n(models: Models, scorer: Scorer, run: EvalRun, audio: np.ndarray, nfe: float, timed: Timed,
              budget_ms: float, upmix_ms: float) -> tuple[dict[str, Any] | None, np.ndarray | None, str]:
    """The run with N candidates per clip, N as many as fit `budget_ms` (generating and scoring each, at
    batch 1) up to max_candidates, the best by the selection score kept: (entry, chosen clips, a note), or
    (None, None, note) when a second candidate does not fit."""
    p = models.p
    scores = [scorer.selection_scores(audio)]
    per_candidate_ms = timed.latency["latency_ms"] + scorer.score_ms
    n = min(p.best_of_n.max_candidates, int(budget_ms // per_candidate_ms))
    if n < 2:
        return None, None, (f"best of N for {run.label}: one candidate ({per_candidate_ms:.0f} ms) fills the budget "
                            f"of {budget_ms:.0f} ms; skipped")
    candidates = [audio]
    for j in range(1, n):
        seeds = [s + j * CANDIDATE_SEED_STRIDE for s in p.seeds]
        candidate, _ = models.clips(f"candidates-{run.label}-{j}", run.stage, run.recipe, seeds)
        candidates.append(candidate)
        scores.append(scorer.selection_scores(candidate))
    pick = adherence.best_candidates(np.stack(scores, axis=1))
    chosen = np.stack([candidates[j][i] for i, j in enumerate(pick)])
    latency = {k: n * v for k, v in timed.latency.items()}
    latency["latency_ms"] += n * scorer.score_ms
    entry = (scorer.score(chosen) | speed(timed.slower(latency), n * nfe, p.seconds, upmix_ms)
             | {"candidates": float(n), "latency_score_ms": n * scorer.score_ms})
    how = ("CLAP score" if scorer.text is not None else
           "tempo/key adherence (what the table's tempo and key columns measure: they improve by construction)")
    return entry, chosen, f"best of N for {run.label}: {n} candidates per prompt within {budget_ms:.0f} ms, by {how}"


def rho_sweep(models: Models, scorer: Scorer, run: EvalRun, rhos: Sequence[float],
              scored: dict[str, Any]) -> list[dict[str, Any]]:
    """Quality of `run` at each rho of its step schedule (`scored`: the run's own entry, at its own rho)."""
    records = []
    for rho in rhos:
        if rho == run.recipe.rho:
            entry = scored
        else:
            recipe = SamplingRecipe.model_validate(run.recipe.model_dump() | {"rho": rho})
            audio, _ = models.clips(f"rho-{run.label}-{rho:g}", run.stage, recipe, models.p.seeds)
            entry = scorer.score(audio)
        records.append({"run": run.label, "rho": rho} | {k: entry[k] for k in QUALITY_KEYS})
    return records


def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.params.evaluate
    if p.resources.gpus > 0 and not torch.cuda.is_available():
        raise InputError(f"evaluate.resources.gpus = {p.resources.gpus} but CUDA is not available here")
    device = torch.device("cuda" if p.resources.gpus > 0 else "cpu")
    torch.set_num_threads(max(1, int(p.resources.cpus)))
    check_runs(ctx, p.runs)
    test = load_test_set(ctx.root, p)
    check_stereo_params(p, test.sample_rate)
    upmixer = load_upmixer(ctx.upstream("train_stereo"), sample_rate=test.sample_rate, device=device)
    embedder = make_embedder(p, device)
    reference, _ = cached(ctx.checkpoint_dir, "reference-embeddings",
                          lambda: (embedder.embed(test.reference, test.sample_rate), {}))
    scorer = Scorer(embedder, test, reference, len(p.seeds), p)
    ctx.tracker.set_tags({"embedder": embedder.name})
    # Before the models: it takes seconds, and a broken stereo path stops the stage before the slow part.
    real_sides = side_embeddings(embedder, test.stereo, test.sample_rate) if len(test.stereo) >= 2 else None
    stereo_scores, upmixed = score_stereo(upmixer, embedder, real_sides, test, p)
    upmix_ms = measure_upmix(upmixer, test.prompt_audio[:1], p.latency_repeats)
    by_label = {r.label: r for r in p.runs}
    models = Models(ctx, test, device, reference_stage=by_label[p.reference_run].stage)

    progress = Progress("evaluate", len(p.runs), unit="run", every_s=0.0)
    generated = {}
    for k, run_ in enumerate(p.runs):
        generated[run_.label] = models.run(run_)
        progress.update(k + 1)
    timed = time_runs(models, p.runs, by_label[p.reference_run], p.latency_repeats,
                      ctx.checkpoint_dir / LATENCY_FILE)
    reference_ms = timed[p.reference_run].latency["latency_ms"]
    latency_ratios = time_pairs(models, [(by_label[a], by_label[b]) for a, b in p.compare],
                                p.compare_latency_repeats, ctx.checkpoint_dir / COMPARE_LATENCY_FILE)

    scorer.set_baseline(generated[p.reference_run][0], p.reference_run)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for run_ in p.runs:
        audio, info = generated[run_.label]
        entry = scorer.score(audio, run_.label) | speed(timed[run_.label], info["nfe"], p.seconds, upmix_ms)
        results.setdefault(run_.name, {})[str(run_.recipe.steps)] = entry
        print(f"evaluate: {run_.label}: " + " ".join(f"{k}={v:.4g}" for k, v in entry.items() if v is not None),
              flush=True)
    clips = {label: audio for label, (audio, _) in generated.items()}
    comparisons = compare_runs(p.compare, {r.label: results[r.name][str(r.recipe.steps)] for r in p.runs},
                               scorer.draw_fads, latency_ratios)

    scaled: dict[str, dict[str, dict[str, Any]]] = {}
    notes = []
    for label in p.best_of_n.runs:
        run_ = by_label[label]
        audio, info = generated[label]
        entry, chosen, note = best_of_n(models, scorer, run_, audio, info["nfe"], timed[label],
                                        p.best_of_n.latency_budget_ms or reference_ms, upmix_ms)
        notes.append(note)
        if entry is not None:
            scaled.setdefault(f"{run_.name}_best_of_n", {})[str(run_.recipe.steps)] = entry
            clips[f"{label} best of {int(entry['candidates'])}"] = chosen
    rho_records = []
    if p.rho_sweep.rhos:
        run_ = by_label[p.rho_sweep.run]
        rho_records = rho_sweep(models, scorer, run_, p.rho_sweep.rhos, results[run_.name][str(run_.recipe.steps)])

    quality, steps = plot_records(results | scaled)
    for name, records in ((PLOT_QUALITY, quality), (PLOT_STEPS, steps), (PLOT_RHO, rho_records)):
        (ctx.out_dir / name).write_text(json.dumps(records, indent=1) + "\n")
    real = scorer.measure(test.prompt_audio)
    real_scores = {"tempo_error": adherence.tempo_error(test.targets, real),
                   "key_accuracy": adherence.key_accuracy(test.targets, real),
                   "key_mirex": adherence.key_mirex(test.targets, real)}
    notes = [f"{len(test.prompts)} prompts x {len(p.seeds)} seeds, {p.seconds:g} s clips at {test.sample_rate} Hz, "
             f"against {len(test.reference)} real test clips; embedding {embedder.name}.",
             f"Latency: batch 1, warm, median of {p.latency_repeats} runs on {device.type} with "
             f"{torch.get_num_threads()} threads; text encoding, sampling and VAE decode included. Each run took "
             f"turns with {p.reference_run}: speedup_vs_base is the median of the rounds' ratios, with that median's "
             "standard error (speedup_vs_base_std). "
             f"Each compared pair took turns with each other for {p.compare_latency_repeats} rounds: its "
             "latency_ratio is the median of the rounds' ratios, with that median's standard error. "
             "RTF = seconds of audio per second of latency.",
             "With few clips FAD is biased upwards: compare runs at equal counts only."
             + ("" if scorer.text is not None else " On this (non-CLAP) embedding FAD, MMD and PRDC compare our "
                "models with each other, never with the paper's numbers."),
             "The last table row scores the real test clips against their own prompts: the tempo and key "
             "estimators' ceiling.",
             f"Stereo: the upmixer (train_stereo) on the mono downmix of the {len(test.stereo)} real stereo clips "
             "among the reference clips, against the real stereo, beside dual mono (side = 0); side_fad is the FAD "
             "of the side signals (L - R) / 2 against the real clips' on the same embedding (dual mono's side is "
             f"silence). The served model's clips upmixed have no real twin: their correlation, width and side "
             f"FAD read beside the real clips'. Upmixing {p.seconds:g} s takes {upmix_ms:.1f} ms (batch 1, warm, "
             f"median of {p.latency_repeats}): latency_stereo_ms = latency_ms + that."] + notes
    served = served_model(results)
    served_label = f"{served}/{best_run_of(results[served])}"
    served_stereo = upmix_all(upmixer, clips[served_label], p.batch)
    stereo_scores["served"] = score_generated_stereo(served_stereo, embedder, real_sides, test.sample_rate)
    stereo = StereoReport(served=served_label, scores=stereo_scores, upmixed=upmixed,
                          served_clips=served_stereo[::len(p.seeds)])  # a clip per prompt: its first seed
    write_report(ctx.out_dir / REPORT, test=test, results=results | scaled, clips=clips, real_scores=real_scores,
                 rho_records=rho_records, comparisons=comparisons, notes=notes, seeds=len(p.seeds), stereo=stereo,
                 stereo_listen_clips=p.stereo.listen_clips)
    stereo_json = _check_metrics(ctx.name, stereo_scores)  # NaN/Inf as null: valid JSON
    (ctx.out_dir / STEREO_FILE).write_text(json.dumps(stereo_json, indent=2, sort_keys=True) + "\n")
    comparisons = _check_metrics(ctx.name, comparisons)  # NaN/Inf as null: valid JSON
    (ctx.out_dir / COMPARE_FILE).write_text(json.dumps(comparisons, indent=2) + "\n")
    for name in (REPORT, PLOT_QUALITY, PLOT_STEPS, PLOT_RHO, STEREO_FILE, COMPARE_FILE):
        ctx.tracker.log_artifact(ctx.out_dir / name)
    ctx.tracker.log_metrics({f"real.{k}": v for k, v in real_scores.items() if v is not None}
                            | flatten_metrics(stereo_json, "stereo.")
                            | flatten_metrics(comparisons, "compare."))
    register_models(ctx, p, results, served)
    return results | scaled


def compare_runs(pairs: Sequence[tuple[str, str]], entries: dict[str, dict[str, Any]],
                 draw_fads: dict[str, np.ndarray], latency_ratios: dict[str, tuple[float, float | None]]
                 ) -> dict[str, dict[str, Any]]:
    """For each pair (a, b) of run labels, keyed by pair_key: fad_diff = FAD(a) - FAD(b) with its paired
    bootstrap spread (both sets resampled by the same draws of prompts; null without draws), and latency_ratio =
    latency(a) / latency(b) with its standard error, from `latency_ratios` (time_pairs). Negative fad_diff: a
    scores better; |fad_diff| below ~2 fad_diff_std is within noise, and so is |latency_ratio - 1| below ~2
    latency_ratio_std."""
    out = {}
    for a, b in pairs:
        paired = a in draw_fads and b in draw_fads
        ratio, ratio_std = latency_ratios[pair_key(a, b)]
        out[pair_key(a, b)] = {"fad_a": entries[a]["fad"], "fad_b": entries[b]["fad"],
                               "fad_diff": entries[a]["fad"] - entries[b]["fad"],
                               "fad_diff_std": float((draw_fads[a] - draw_fads[b]).std(ddof=1)) if paired else None,
                               "latency_ratio": ratio, "latency_ratio_std": ratio_std}
    return out


def served_model(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The model to serve (alias `best`): Presto-LS when it was evaluated, else the model whose best run has the
    lowest FAD."""
    if "presto_ls" in results:
        return "presto_ls"
    fad = {name: by_steps[best_run_of(by_steps)]["fad"] for name, by_steps in results.items()}
    return min(fad, key=lambda n: (fad[n] is None, fad[n] or 0.0))


def register_models(ctx: StageContext, p: EvaluateParams, results: dict[str, dict[str, dict[str, Any]]],
                    served: str) -> None:
    """Every evaluated model as presto-<name>, with the recipe of its lowest-FAD run and the upmixer; the alias
    `best` on the `served` one."""
    stage_of = {r.name: r.stage for r in p.runs}
    for name, by_steps in results.items():
        steps = best_run_of(by_steps)
        run_ = next(r for r in p.runs if r.name == name and str(r.recipe.steps) == steps)
        config = {"recipe": run_.recipe.model_dump(mode="json"), "seconds": p.seconds, "run": run_.label,
                  "fad": by_steps[steps]["fad"]}
        with bundle(ctx.root, stage_of[name]) as files:
            ctx.tracker.log_model(name, files, config, BEST_ALIAS if name == served else None)
    ctx.tracker.set_tags({"best_model": f"presto-{served}"})
