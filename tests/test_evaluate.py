"""The evaluate stage on a tiny random bundle and a tiny artifacts tree: every key for every run, NFE and
speed-up bookkeeping, the upmixer's stereo scores and stereo latency, a resumed run after a crash, a
self-contained report that escapes captions and plays stereo, valid plot files, registration with the
upmixer; and the adherence and report units against hand-computed cases."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from recording_tracker import RecordingTracker
from test_upmixer import TINY_UPMIXER

from presto.config import Params, load_params
from presto.data.latents import LATENT_STATS, TEXT_ENCODER, LatentStats
from presto.data.shards import MANIFEST, ShardWriter, write_manifest
from presto.distill.presto_l import BudgetSchedule, BudgetScheduleConfig, save_schedule
from presto.errors import InputError, ParamsError
from presto.eval import adherence
from presto.eval.adherence import Measured, Target
from presto.eval.report import ListenGrid, ListenRow, Table, render_report
from presto.generation import EDM_FILE, MODEL_DIR
from presto.models.checkpoint import save_model
from presto.models.dit import DiT, DiTConfig
from presto.models.upmixer import INFO_FILE, Upmixer
from presto.models.vae import AudioVAE, VAEConfig
from stages import evaluate
from stages.base import StageContext
from stages.runner import _check_metrics
from stages.specs import get

REPO = Path(__file__).resolve().parents[1]
SR, C = 8000, 4
VAE_CFG = VAEConfig(channels=4, channel_multipliers=[1, 2, 2], strides=[4, 4, 4], latent_channels=C, dilations=[1],
                    kernel_size=3)  # hop 64
SCRIPT = "<script>alert(1)</script>"
REQUIRED = ("fad", "mmd", "density", "recall", "coverage", "clap_score", "tempo_error", "key_accuracy", "nfe",
            "latency_ms", "rtf", "speedup_vs_base", "speedup_vs_base_std")
STEREO_CLIPS = [0, 1, 2, 4, 5, 6, 7]  # the long test clips with a stereo original (clip 3 is a mono source)


# ---- adherence ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, tempo, key", [
    ("at 129 bpm, 4/4 meter, in Bb major.", 129.0, "Bb major"),
    ("castle, fantasy, medieval --bpm 100", 100.0, None),
    ("a minor change of mood, F# minor, 96.5 BPM", 96.5, "F# minor"),
    ("tempo 500 bpm, then 90 bpm", 90.0, None),  # 500 is no tempo a clip has: the next one counts
    ("calm piano", None, None),
])
def test_prompt_target(prompt, tempo, key):
    assert adherence.prompt_target(prompt) == Target(tempo, key)


def test_adherence_scores_by_hand():
    targets = [Target(120.0, "C major"), Target(None, None), Target(100.0, None), Target(None, "A minor")]
    measured = [Measured(132.0, "C major"), Measured(90.0, "G major"), Measured(math.nan, None),
                Measured(80.0, "C major")]
    assert adherence.tempo_error(targets, measured) == pytest.approx((10.0 + 100.0) / 2)  # no pulse: 100 %
    assert adherence.key_accuracy(targets, measured) == pytest.approx(0.5)
    assert adherence.key_mirex(targets, measured) == pytest.approx((1.0 + 0.3) / 2)  # A minor -> C: relative
    assert adherence.tempo_error(targets[1:2], measured[1:2]) is None  # nothing asked, nothing scored
    assert adherence.adherence_score(Target(120.0, "C major"), Measured(60.0, "G major")) == pytest.approx(0.5)
    assert adherence.adherence_score(Target(None, None), Measured(60.0, "G major")) is None
    with pytest.raises(ValueError, match="one per clip"):
        adherence.key_accuracy(targets, measured[:2])


def test_best_candidates_prefers_highest_then_first():
    scores = np.array([[0.1, 0.9, 0.9], [np.nan, np.nan, np.nan], [0.5, np.nan, 0.2]])
    assert adherence.best_candidates(scores).tolist() == [1, 0, 0]


def click_chords(bpm: float, seconds: float, sr: int) -> np.ndarray:
    """A C major triad struck on every beat, decaying: tempo and key known by construction."""
    t = np.arange(round(seconds * sr)) / sr
    phase = (t * bpm / 60.0) % 1.0
    envelope = np.exp(-phase * 60.0 / bpm / 0.08)
    tones = sum(np.sin(2 * np.pi * 261.63 * 2 ** (s / 12) * t) for s in (0, 4, 7))
    return (0.2 * envelope * tones).astype(np.float32)


def test_measure_finds_tempo_and_key_of_a_known_clip():
    m = adherence.measure(click_chords(120.0, 3.0, 16000), 16000)
    assert m.key == "C major" and abs(m.tempo - 120.0) <= 0.04 * 120.0
    assert adherence.tempo_error([Target(120.0, "C major")], [m]) < 4.0


# ---- report ---------------------------------------------------------------------------------------------


def test_report_is_self_contained_and_escaped():
    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(SR)).astype(np.float32)
    stereo = np.stack([clip, 0.5 * clip])
    html = render_report(title=f"t {SCRIPT}", notes=[f'note "{SCRIPT}"'],
                         tables=[Table(f"metrics {SCRIPT}", ["model", "fad"],
                                       [{"model": f"m{SCRIPT}", "fad": 1.5}, {"model": "x", "fad": None}])],
                         plots=[], grids=[ListenGrid("Listen", f"n {SCRIPT}", "prompt", ["real", "base/4", "stereo"],
                                                     [ListenRow(f"{SCRIPT} at 120 bpm", f"clip {SCRIPT}",
                                                                {"real": clip, "stereo": stereo})])],
                         sample_rate=SR)
    # the title (twice), the note, the table's heading and row, the grid's note, the prompt and its details
    assert "<script" not in html and html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 8
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    uris = re.findall(r'src="data:(audio/[a-z]+);base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 2  # the empty base/4 cell holds no player
    (mono, rate), (two, rate_2) = (sf.read(io.BytesIO(base64.b64decode(u[1]))) for u in uris)
    assert rate == rate_2 == SR and abs(len(mono) - SR) <= 64
    assert mono.ndim == 1 and two.ndim == 2 and two.shape[1] == 2  # the stereo clip plays in stereo
    assert html.count('class="spec stereo"') == 1
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert pngs and all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


# ---- the stage ------------------------------------------------------------------------------------------


def tone_clip(seconds: float, f0: float, bpm: float) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (0.2 * np.exp(-((t * bpm / 60.0) % 1.0) * 4.0) * np.sin(2 * np.pi * f0 * t)).astype(np.float32)


def random_dit(budget_conditioning: bool = False) -> DiT:
    torch.manual_seed(0)
    dit = DiT(DiTConfig(latent_channels=C, width=32, depth=2, heads=2, mlp_ratio=2.0, text_dim=384,
                        budget_conditioning=budget_conditioning))
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return dit


def make_artifacts(root: Path) -> None:
    """prepare (8 test clips of 1.25 s, all but one with a stereo original, one short one, train clips),
    caption, train_vae, train_stereo, encode, train_dit, and an ase model with its layer schedule."""
    art = root / "artifacts"
    rows = []
    with (ShardWriter(art / "prepare", "mono", 64) as long, ShardWriter(art / "prepare", "short", 64) as short,
          ShardWriter(art / "prepare", "stereo", 64) as two):
        for i in range(11):
            split = "train" if i >= 9 else "test"
            seconds = 0.5 if i == 8 else 1.25
            f0, bpm = 220.0 * 1.06 ** i, 90 + 5 * i
            # stereo: the tone left, the tone and its fifth right
            stereo = np.stack([tone_clip(seconds, f0, bpm), 0.5 * (tone_clip(seconds, f0, bpm)
                                                                    + tone_clip(seconds, 1.5 * f0, bpm))])
            shard, index = (short if seconds < 1 else long).add(stereo.mean(axis=0))
            rows.append({"clip_id": f"clip-{i}", "track_id": f"t{i // 3}", "split": split, "shard": f"prepare/{shard}",
                         "index": index, "sample_rate": SR, "seconds": seconds, "bpm": bpm})
            if i in STEREO_CLIPS:
                stereo_shard, stereo_index = two.add(stereo)
                rows[-1] |= {"stereo_shard": f"prepare/{stereo_shard}", "stereo_index": stereo_index}
    write_manifest(art / "prepare" / MANIFEST, rows)
    captions = [{"clip_id": r["clip_id"], "split": r["split"],
                 "captions": [f"organ, {r['bpm']} bpm", f"{SCRIPT} at {r['bpm']} bpm, in C major"]} for r in rows]
    (art / "caption").mkdir()
    write_manifest(art / "caption" / "captions.jsonl", captions)
    torch.manual_seed(0)
    save_model(AudioVAE(VAE_CFG), VAE_CFG, art / "train_vae" / "model")
    save_model(Upmixer(TINY_UPMIXER), TINY_UPMIXER, art / "train_stereo" / "model")
    (art / "train_stereo" / INFO_FILE).write_text(json.dumps({"sample_rate": SR}))
    (art / "encode").mkdir()
    LatentStats(mean=[0.1] * C, std=[1.5] * C, sigma_data=0.5, hop_length=64, sample_rate=SR,
                frames_per_second=SR / 64, latent_channels=C).save(art / "encode" / LATENT_STATS)
    (art / "encode" / TEXT_ENCODER).write_text(json.dumps({"kind": "minilm", "path": None, "max_tokens": 16}))
    edm = json.dumps({"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0})
    for stage in ("train_dit", "ase"):
        dit = random_dit()
        save_model(dit, dit.cfg, art / stage / MODEL_DIR)
        (art / stage / EDM_FILE).write_text(edm)
    schedule = BudgetSchedule(BudgetScheduleConfig(reference_depth=28, budgets=[28, 14], sigma_bounds=[1.0]),
                              depth=2, reroute=False)
    save_schedule(schedule, art / "ase" / evaluate.SCHEDULE_FILE)


def recipe(sampler: str, steps: int, guidance: str) -> dict:
    return {"sampler": sampler, "steps": steps, "rho": 7.0, "sigma_min": 0.002, "sigma_max": 80.0,
            "guidance": guidance, "scale": 0.8, "budgets": None}


def tiny_params(**changes) -> Params:
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["evaluate"] = {
        "runs": [{"name": "base", "stage": "train_dit", "recipe": recipe("dpmpp_2m", 3, "cfgpp")},
                 {"name": "presto_s", "stage": "train_dit", "recipe": recipe("consistency", 2, "none")},
                 {"name": "ase", "stage": "ase", "recipe": recipe("dpmpp_2m", 3, "cfgpp")}],
        "reference_run": "base/3", "n_prompts": 2, "reference_clips": 8, "seconds": 1.0, "seeds": [0, 1],
        "batch": 4, "latency_repeats": 3, "compare_latency_repeats": 3, "fad_bootstrap": 20,
        "compare": [["ase/3", "base/3"]],
        "embedder": {"kind": "default", "checkpoint": None, "audio_model": "HTSAT-base", "enable_fusion": False},
        "mmd_bandwidth": 10.0, "prdc_k": 1,
        "best_of_n": {"runs": ["presto_s/2"], "max_candidates": 2, "latency_budget_ms": 1e7},
        "rho_sweep": {"run": "presto_s/2", "rhos": [1.0, 7.0]},
        "stereo": {"stft_fft_sizes": [64, 128, 256], "listen_clips": 2},
        "resources": {"cpus": 1, "gpus": 0},
    } | changes
    return Params.model_validate(raw)


def context(root: Path, params: Params) -> StageContext:
    out = root / "out"
    out.mkdir(exist_ok=True)
    return StageContext(name="evaluate", params=params, root=root, out_dir=out, checkpoint_dir=root / "ckpt",
                        fingerprint="f", tracker=RecordingTracker())


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The stage crashes in its second generation, then a rerun resumes: (metrics, ctx, generations rerun)."""
    root = tmp_path_factory.mktemp("evaluate")
    make_artifacts(root)
    threads = torch.get_num_threads()
    real = evaluate.generate_set
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(evaluate, "generate_set", crash_on_second)
        with pytest.raises(RuntimeError, match="simulated crash"):
            evaluate.run(context(root, tiny_params()))
        calls.clear()
        mp.setattr(evaluate, "generate_set", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
        ctx = context(root, tiny_params())
        metrics = evaluate.run(ctx)
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return metrics, ctx, len(calls)


def test_every_run_has_every_key(evaluated):
    metrics, _, _ = evaluated
    assert {k: sorted(v) for k, v in metrics.items()} == {"base": ["3"], "presto_s": ["2"], "ase": ["3"],
                                                           "presto_s_best_of_n": ["2"]}
    runs = metrics  # one entry per model and step count, each with every key
    upmix_ms = {entry["upmix_ms"] for by_steps in runs.values() for entry in by_steps.values()}
    assert len(upmix_ms) == 1 and upmix_ms.pop() > 0  # one upmixer, one clip length: one time
    for by_steps in runs.values():
        for entry in by_steps.values():
            assert set(REQUIRED) <= set(entry)
            assert entry["clap_score"] is None  # the default embedder has no text tower
            for key in REQUIRED[:5] + ("latency_ms", "rtf", "speedup_vs_base", "speedup_vs_base_std"):
                assert math.isfinite(entry[key]), key
            assert entry["tempo_error"] >= 0 and 0 <= entry["key_accuracy"] <= 1
            assert entry["latency_stereo_ms"] == pytest.approx(entry["latency_ms"] + entry["upmix_ms"])
    assert _check_metrics("evaluate", metrics) == metrics  # what the runner writes as metrics.json


def test_stereo_scores_the_upmixer_beside_dual_mono(evaluated):
    _, ctx, _ = evaluated
    stereo = json.loads((ctx.out_dir / evaluate.STEREO_FILE).read_text())
    assert stereo["real"]["clips"] == len(STEREO_CLIPS)  # the reference clips with a stereo original
    for side in ("upmixer", "dual_mono"):
        assert set(stereo[side]) == set(evaluate.STEREO_KEYS) | {"side_fad"}
        assert all(math.isfinite(v) for v in stereo[side].values()), side
    dual = stereo["dual_mono"]
    assert dual["correlation"] == pytest.approx(1.0) and dual["width"] == 0.0
    assert dual["width_error"] == pytest.approx(stereo["real"]["width"]) and stereo["real"]["width"] > 0
    assert dual["correlation_error"] == pytest.approx(1.0 - stereo["real"]["correlation"])
    assert stereo["upmixer"]["side_fad"] >= 0 and dual["side_fad"] > 0
    served = stereo["served"]  # the served model's clips upmixed: 2 prompts x 2 seeds, no real twin
    assert set(served) == {"correlation", "width", "side_fad"} and all(math.isfinite(v) for v in served.values())


def test_stereo_needs_the_upmixer_and_long_enough_clips(tmp_path):
    make_artifacts(tmp_path)
    test = evaluate.load_test_set(tmp_path, tiny_params().evaluate)
    upmixer = evaluate.load_upmixer(tmp_path / "artifacts" / "train_stereo", sample_rate=SR)
    with pytest.raises(ParamsError, match="evaluate.stereo.stft_fft_sizes"):
        evaluate.check_stereo_params(tiny_params(stereo={"stft_fft_sizes": [16384], "listen_clips": 1}).evaluate, SR)
    mono_only = dataclasses.replace(test, stereo_ids=[], stereo=test.stereo[:0])
    scores, upmixed = evaluate.score_stereo(upmixer, None, None, mono_only, tiny_params().evaluate)
    assert scores["real"]["clips"] == 0 and scores["upmixer"]["side_fad"] is None and upmixed.shape[0] == 0
    (tmp_path / "artifacts" / "train_stereo" / INFO_FILE).unlink()
    threads = torch.get_num_threads()
    try:
        with pytest.raises(InputError, match="run the train_stereo stage first"):
            evaluate.run(context(tmp_path, tiny_params()))
    finally:
        torch.set_num_threads(threads)


def test_fad_spread_is_paired_with_the_reference_run(evaluated):
    metrics, _, _ = evaluated
    base, student = metrics["base"]["3"], metrics["presto_s"]["2"]
    # The reference run against itself: the same clips on every resample, so no difference and no spread.
    assert base["fad_vs_reference"] == 0.0 and base["fad_vs_reference_std"] == 0.0
    assert base["fad_std"] > 0 and student["fad_std"] > 0
    assert student["fad_vs_reference"] == pytest.approx(student["fad"] - base["fad"])
    assert student["fad_vs_reference_std"] > 0


def test_compare_pairs_runs_on_the_same_resamples(evaluated):
    metrics, ctx, _ = evaluated
    comparisons = json.loads((ctx.out_dir / evaluate.COMPARE_FILE).read_text())
    assert list(comparisons) == ["ase/3 vs base/3"]
    pair = comparisons["ase/3 vs base/3"]
    assert set(pair) == set(evaluate.COMPARE_KEYS)
    ase, base = metrics["ase"]["3"], metrics["base"]["3"]
    assert pair["fad_diff"] == pytest.approx(ase["fad"] - base["fad"])
    # The difference's draws are ase's minus the reference run's: the spread fad_vs_reference already has.
    assert pair["fad_diff_std"] == pytest.approx(ase["fad_vs_reference_std"])
    # The two runs took turns with each other for their own rounds (after a warm-up round), saved for a rerun;
    # the ratio is the median of the rounds' ratios.
    rounds = json.loads((ctx.checkpoint_dir / evaluate.COMPARE_LATENCY_FILE).read_text())["ase/3 vs base/3"]
    a_ms, b_ms = evaluate.totals(rounds["a"]), evaluate.totals(rounds["b"])
    assert len(a_ms) == len(b_ms) == 3
    ratios = sorted(a / b for a, b in zip(a_ms, b_ms))
    assert pair["latency_ratio"] == pytest.approx(ratios[1])
    assert pair["latency_ratio_std"] >= 0
    with pytest.raises(Exception, match="compare"):
        tiny_params(compare=[["ase/3", "presto_l/32"]])
    # In the tracker too, under the same key.
    logged = {k: v for step, m in ctx.tracker.metrics for k, v in m.items() if k.startswith("compare.")}
    assert logged["compare.ase/3 vs base/3.fad_diff"] == pytest.approx(pair["fad_diff"])


def test_speed_bookkeeping(evaluated):
    metrics, ctx, _ = evaluated
    base, student, ase = metrics["base"]["3"], metrics["presto_s"]["2"], metrics["ase"]["3"]
    # The reference run is timed alone: every round's ratio is 1, with no spread.
    assert base["speedup_vs_base"] == 1.0 and base["speedup_vs_base_std"] == 0.0
    assert base["reference_latency_ms"] == base["latency_ms"]
    assert base["nfe"] == 6 and ase["nfe"] == 6  # CFG++: two evaluations per step
    assert student["nfe"] == 2  # consistency sampling, no guidance: one per step
    # The median of the ratios of the rounds the student took turns with the reference run (after a warm-up
    # round), not of the reference run's own rounds.
    rounds = json.loads((ctx.checkpoint_dir / evaluate.LATENCY_FILE).read_text())["presto_s/2"]
    reference_ms = evaluate.totals(rounds["a"])
    ratios = sorted(r / t for r, t in zip(reference_ms, evaluate.totals(rounds["b"])))
    assert len(ratios) == 3 and student["speedup_vs_base"] == pytest.approx(ratios[1])
    assert student["speedup_vs_base_std"] >= 0
    assert student["reference_latency_ms"] == pytest.approx(sorted(reference_ms)[1])
    assert student["reference_latency_ms"] != base["latency_ms"]  # timed again, beside the student
    assert base["rtf"] == pytest.approx(1.0 / (base["latency_ms"] / 1e3))  # 1 s of audio
    best = metrics["presto_s_best_of_n"]["2"]
    assert best["candidates"] == 2 and best["nfe"] == 4
    assert best["latency_ms"] == pytest.approx(2 * student["latency_ms"] + best["latency_score_ms"])
    # The student's rounds, each generation taking best of N's latency: the speed-up and its error shrink alike.
    slower = student["latency_ms"] / best["latency_ms"]
    assert best["speedup_vs_base"] == pytest.approx(student["speedup_vs_base"] * slower)
    assert best["speedup_vs_base_std"] == pytest.approx(student["speedup_vs_base_std"] * slower)
    assert best["reference_latency_ms"] == student["reference_latency_ms"]


def test_rerun_resumes_from_the_checkpoint(evaluated):
    _, _, rerun_generations = evaluated
    # 3 runs + 1 best-of-N candidate set + 1 rho (rho 7 is the run itself) = 5; the first was saved before
    # the crash, so the rerun generates 4.
    assert rerun_generations == 4
    # Each run's timings are kept beside the clips, for a rerun to read back instead of timing again.
    metrics, ctx, _ = evaluated
    saved = json.loads((ctx.checkpoint_dir / evaluate.LATENCY_FILE).read_text())
    assert {k: sorted(evaluate.totals(v["b"]))[1] for k, v in saved.items()} == {
        "base/3": metrics["base"]["3"]["latency_ms"], "presto_s/2": metrics["presto_s"]["2"]["latency_ms"],
        "ase/3": metrics["ase"]["3"]["latency_ms"]}


def test_report_and_plots(evaluated):
    _, ctx, _ = evaluated
    html = (ctx.out_dir / evaluate.REPORT).read_text()
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    # a row per prompt: the real clip, every run, the best-of-N run and the served run upmixed, each with a
    # player; then real stereo, upmixed and mono for each of listen_clips real stereo test clips
    assert html.count("<audio") == 2 * (1 + 3 + 1 + 1) + 2 * 3
    assert html.count('class="spec stereo"') == 2 + 2 * 2
    assert "Stereo: the upmixer against the real stereo test clips" in html
    for plot in get("evaluate").plots:
        records = json.loads((ctx.out_dir / plot.file).read_text())
        assert records and all(isinstance(r, dict) for r in records)
        assert all(plot.x in r and plot.y in r and not any(isinstance(v, (dict, list)) for v in r.values())
                   for r in records)
    # The DVC metrics files beside metrics.json: nested dicts of numbers (or null), as DVC reads them.
    for name in get("evaluate").extra_metrics:
        document = json.loads((ctx.out_dir / name).read_text())
        assert document and _check_metrics("evaluate", document) == document, name
    rho = json.loads((ctx.out_dir / evaluate.PLOT_RHO).read_text())
    assert [r["rho"] for r in rho] == [1.0, 7.0]
    assert set(ctx.tracker.artifact_files()) >= {evaluate.REPORT, evaluate.PLOT_QUALITY}


def test_models_registered_with_one_best(evaluated):
    metrics, ctx, _ = evaluated
    models = {m["name"]: m for m in ctx.tracker.models}
    assert set(models) == {"base", "presto_s", "ase"}
    assert [m["alias"] for m in models.values()].count("best") == 1
    chosen = min(("base", "presto_s", "ase"), key=lambda n: next(iter(metrics[n].values()))["fad"])
    assert models[chosen]["alias"] == "best" and ctx.tracker.tags["best_model"] == f"presto-{chosen}"
    assert models["ase"]["files"]["model"] == sorted([MODEL_DIR, EDM_FILE, evaluate.SCHEDULE_FILE])
    assert models["base"]["files"]["encode"] == sorted([LATENT_STATS, TEXT_ENCODER])
    assert models["base"]["files"]["upmixer"] == sorted([INFO_FILE, "model"])
    assert models["presto_s"]["config"]["recipe"]["sampler"] == "consistency"


def test_bad_runs_are_refused(tmp_path):
    (tmp_path / "artifacts").mkdir()
    params = tiny_params(runs=[{"name": "base", "stage": "demo_corpus", "recipe": recipe("dpmpp_2m", 3, "cfgpp")}],
                         best_of_n={"runs": [], "max_candidates": 2, "latency_budget_ms": None},
                         rho_sweep={"run": "base/3", "rhos": []}, compare=[])
    with pytest.raises(ParamsError, match="not an upstream"):
        evaluate.check_runs(context(tmp_path, params), params.evaluate.runs)
    params = tiny_params()
    with pytest.raises(InputError, match="train_dit stage first"):
        evaluate.check_runs(context(tmp_path, params), params.evaluate.runs)
    with pytest.raises(Exception, match="reference_run"):
        tiny_params(reference_run="base/32")
    with pytest.raises(Exception, match="prdc_k"):
        tiny_params(prdc_k=4)


class FakeClap:
    """A stand-in with CLAP's interface: audio and text in one space (loudness per eighth of the clip, and a
    vector per prompt length), so clap_score and CLAP-based selection have something to work on."""

    name, dim = "fake-clap", 8

    def embed(self, audio, sr):
        segments = np.array_split(np.asarray(audio, dtype=np.float64), self.dim, axis=1)
        return np.stack([np.sqrt((s ** 2).mean(axis=1)) for s in segments], axis=1) + 1e-3

    def text_embed(self, texts):
        return np.stack([np.random.default_rng(len(t)).standard_normal(self.dim) for t in texts])


def test_clap_embedder_gives_clap_score_and_selects_by_it(tmp_path, monkeypatch):
    make_artifacts(tmp_path)
    monkeypatch.setattr(evaluate, "make_embedder", lambda p, device: FakeClap())
    params = tiny_params(runs=[{"name": "base", "stage": "train_dit", "recipe": recipe("dpmpp_2m", 2, "cfgpp")}],
                         reference_run="base/2", latency_repeats=1, compare=[],
                         best_of_n={"runs": ["base/2"], "max_candidates": 3, "latency_budget_ms": 1e7},
                         rho_sweep={"run": "base/2", "rhos": []})
    threads = torch.get_num_threads()
    try:
        metrics = evaluate.run(context(tmp_path, params))
    finally:
        torch.set_num_threads(threads)
    plain, best = metrics["base"]["2"], metrics["base_best_of_n"]["2"]
    assert -100 <= plain["clap_score"] <= 100 and best["candidates"] == 3
    # each prompt keeps its highest-cosine candidate, the run's own clip among them
    assert best["clap_score"] >= plain["clap_score"]
    assert json.loads((tmp_path / "out" / evaluate.PLOT_RHO).read_text()) == []


def test_generated_sets_are_prompt_major_and_checked():
    class Echo:  # sample value = 10 * prompt index + seed, NaN for the prompt "nan"
        def generate(self, prompts, seconds, seeds, recipe):
            values = [math.nan if p == "nan" else 10 * int(p) + s for p, s in zip(prompts, seeds)]
            return np.repeat(np.array(values, dtype=np.float32)[:, None], 2, axis=1), {"nfe": 6.0}

    r = tiny_params().evaluate.runs[0].recipe
    audio, info = evaluate.generate_set(Echo(), ["0", "1", "2"], [0, 1], 0.1, r, 4, "base/3")
    assert audio[:, 0].tolist() == [0, 1, 10, 11, 20, 21] and info == {"nfe": 6.0}
    with pytest.raises(InputError, match="base/3.*NaN"):
        evaluate.generate_set(Echo(), ["0", "nan"], [0], 0.1, r, 4, "base/3")


def test_prompt_choice_prefers_stated_tempo_and_key():
    assert evaluate.choose_prompt(["music", "at 120 bpm", "in C major at 90 bpm", "D minor, 100 bpm"]) == \
        "in C major at 90 bpm"
    assert evaluate.choose_prompt(["music", "C major", "at 120 bpm"]) == "C major"
    assert evaluate.choose_prompt(["music", "organ"]) == "music"


def test_test_set_choice(tmp_path):
    make_artifacts(tmp_path)
    test = evaluate.load_test_set(tmp_path, tiny_params(n_prompts=3).evaluate)
    assert test.clip_ids == ["clip-0", "clip-4", "clip-7"]  # spread over the 8 long-enough test clips
    assert all(t.key == "C major" for t in test.targets)  # the caption stating tempo and key was chosen
    assert test.reference.shape == (8, SR) and test.prompt_audio.shape == (3, SR)
    assert test.stereo_ids == [f"clip-{i}" for i in STEREO_CLIPS] and test.stereo.shape == (len(STEREO_CLIPS), 2, SR)
    np.testing.assert_allclose(test.stereo[0].mean(axis=0), test.reference[0], atol=1e-4)  # its mono downmix
    with pytest.raises(InputError, match="n_prompts"):
        evaluate.load_test_set(tmp_path, tiny_params(n_prompts=9).evaluate)
