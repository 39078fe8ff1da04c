"""How repeatable evaluate's speed numbers are, timed `--trials` times on a project's trained models.

Speed-ups: each run's speed-up over the reference run, the way evaluate times it (each run taking turns with
the reference run, `stages.evaluate.time_runs`, `evaluate.latency_repeats` rounds, the median of the rounds'
ratios) with the standard error evaluate gives it, beside the ratio of the two runs' medians over the same
rounds (as evaluate took it before) and beside timing each run on its own, one after the other.

Comparisons (--pairs a,b ..., instead of the speed-ups): the latency ratio a / b the way evaluate takes it (a
and b taking turns with each other, `stages.evaluate.time_pairs`, `evaluate.compare_latency_repeats` rounds)
beside the ratio of the two runs' speed-ups over the reference run (--runs' first), as evaluate took it before.

All use evaluate's batch-1 call (its first test prompt; text + sampling + decode) after a warm-up round, with
--threads CPU threads. A number's spread is (max - min) / mean over the trials, sd its standard deviation over
them.

    .venv/bin/python bench/eval_timing.py --root /tmp/demo4 --runs base/32 presto_l/32 ase/32 --trials 3
    .venv/bin/python bench/eval_timing.py --root /tmp/demo20 --runs base/32 --pairs presto_ls/2,presto_s/2 \
        presto_l/32,ase/32 --trials 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from presto.config import load_params  # noqa: E402
from stages import evaluate  # noqa: E402
from stages.base import StageContext  # noqa: E402


def speedups(models: evaluate.Models, runs: list, reference, repeats: int, trials: int, folder: Path
             ) -> dict[str, dict[str, list[float]]]:
    """{timing: {run label: its speed-up in each trial}}: "paired", evaluate's (the median of the `repeats`
    rounds' ratios), with its standard error under "paired: speedup_vs_base_std"; "paired, ratio of medians",
    the same rounds as evaluate took them before; "separate", each run timed on its own. `folder` takes
    time_runs' files."""
    error, medians = "paired: speedup_vs_base_std", "paired, ratio of medians"
    out: dict[str, dict[str, list[float]]] = {"paired": {}, error: {}, medians: {}, "separate": {}}
    for trial in range(trials):
        timed = evaluate.time_runs(models, runs, reference, repeats, folder / f"latency-{trial}.json")
        for label, speed in timed.items():
            out["paired"].setdefault(label, []).append(speed.speedup)
            out[error].setdefault(label, []).append(float("nan") if speed.speedup_std is None else speed.speedup_std)
            out[medians].setdefault(label, []).append(speed.reference_ms / speed.latency["latency_ms"])
        alone = {}
        for run in runs:
            call = models.latency_calls([run])[run.label]
            call()  # warm-up
            alone[run.label] = evaluate.median_latency([call() for _ in range(repeats)])["latency_ms"]
        for label, ms in alone.items():
            out["separate"].setdefault(label, []).append(alone[reference.label] / ms)
    return out


def ratios(models: evaluate.Models, pairs: list, reference, p, trials: int, folder: Path
           ) -> dict[str, dict[str, list[float]]]:
    """{"pair, N rounds" | "via reference, M rounds": {"a / b": the latency ratio in each trial}}, and under
    "pair, N rounds: latency_ratio_std" the standard error evaluate gives each trial's ratio, to set beside the
    ratios' spread over the trials; `folder` takes the timing files."""
    runs = list({run.label: run for pair in pairs for run in pair}.values())
    direct, via = f"pair, {p.compare_latency_repeats} rounds", f"via reference, {p.latency_repeats} rounds"
    error = f"{direct}: latency_ratio_std"
    out: dict[str, dict[str, list[float]]] = {direct: {}, error: {}, via: {}}
    for trial in range(trials):
        found = evaluate.time_pairs(models, pairs, p.compare_latency_repeats, folder / f"pairs-{trial}.json")
        timed = evaluate.time_runs(models, runs, reference, p.latency_repeats, folder / f"latency-{trial}.json")
        for a, b in pairs:
            key = evaluate.pair_key(a.label, b.label)
            ratio, std = found[key]
            out[direct].setdefault(key, []).append(ratio)
            out[error].setdefault(key, []).append(float("nan") if std is None else std)
            out[via].setdefault(key, []).append(timed[b.label].speedup / timed[a.label].speedup)
    return out


def table(found: dict[str, dict[str, list[float]]], what: str, of: str) -> str:
    rows = [f"| timing | {of} | {what} per trial | spread | sd |", "|---|---|---|---:|---:|"]
    for how, by_run in found.items():
        for label, values in by_run.items():
            mean = float(np.mean(values))  # NaN where a value is (a standard error from one round)
            spread = (max(values) - min(values)) / mean if mean > 0 else float("nan")
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            rows.append(f"| {how} | {label} | {' / '.join(f'{v:.3f}' for v in values)} | {100 * spread:.1f} % "
                        f"| {sd:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="project whose artifacts/ hold the trained models")
    ap.add_argument("--runs", nargs="+", required=True, help="labels of evaluate.runs; the first is the reference")
    ap.add_argument("--pairs", nargs="+", default=[], metavar="A,B",
                    help="time these pairs of evaluate.runs labels instead of --runs' speed-ups")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_params(args.root / "params.yaml")
    p = params.evaluate
    by_label = {r.label: r for r in p.runs}
    pairs = [tuple(pair.split(",")) for pair in args.pairs]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--pairs {args.pairs}: each is two run labels joined by a comma, a,b")
    missing = [label for label in args.runs + [x for pair in pairs for x in pair] if label not in by_label]
    if missing:
        raise SystemExit(f"--runs {missing}: not in {args.root / 'params.yaml'} evaluate.runs ({sorted(by_label)})")
    runs = [by_label[label] for label in args.runs]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext(name="evaluate", params=params, root=args.root, out_dir=Path(tmp), checkpoint_dir=Path(tmp),
                           fingerprint="bench", tracker=None)
        models = evaluate.Models(ctx, evaluate.load_test_set(args.root, p), torch.device("cpu"), runs[0].stage)
        if pairs:
            found = ratios(models, [(by_label[a], by_label[b]) for a, b in pairs], runs[0], p, args.trials, Path(tmp))
        else:
            found = speedups(models, runs, runs[0], p.latency_repeats, args.trials, Path(tmp))
    print(f"# {args.root}: {args.trials} trials, every timing after a warm-up round, {args.threads} threads\n")
    print(table(found, "latency ratio", "pair") if pairs else table(found, "speed-up", "run"))
    return found


if __name__ == "__main__":
    main()
