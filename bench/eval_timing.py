"""How repeatable evaluate's speed-ups are: each run's speed-up over the reference run, timed `--trials` times
on a project's trained models, the way evaluate times it (each run taking turns with the reference run,
`stages.evaluate.time_runs`) beside the way it did before (each run timed on its own, one after the other).

Both ways use evaluate's batch-1 call (its first test prompt; text + sampling + decode) and its
`evaluate.latency_repeats` (the median after a warm-up), with --threads CPU threads. A run's spread is
(max - min) / mean of its speed-ups over the trials.

    .venv/bin/python bench/eval_timing.py --root /tmp/demo4 --runs base/32 presto_l/32 ase/32 --trials 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from presto.config import load_params  # noqa: E402
from stages import evaluate  # noqa: E402
from stages.base import StageContext  # noqa: E402


def speedups(models: evaluate.Models, runs: list, reference, repeats: int, trials: int, folder: Path
             ) -> dict[str, dict[str, list[float]]]:
    """{"paired" | "separate": {run label: its speed-up in each trial}}; `folder` takes time_runs' files."""
    out: dict[str, dict[str, list[float]]] = {"paired": {}, "separate": {}}
    for trial in range(trials):
        timed = evaluate.time_runs(models, runs, reference, repeats, folder / f"latency-{trial}.json")
        for label, (latency, reference_ms) in timed.items():
            out["paired"].setdefault(label, []).append(reference_ms / latency["latency_ms"])
        alone = {}
        for run in runs:
            call = models.latency_call(run)
            call()  # warm-up
            alone[run.label] = evaluate.median_latency([call() for _ in range(repeats)])["latency_ms"]
        for label, ms in alone.items():
            out["separate"].setdefault(label, []).append(alone[reference.label] / ms)
    return out


def table(found: dict[str, dict[str, list[float]]]) -> str:
    rows = ["| timing | run | speed-up per trial | spread |", "|---|---|---|---|"]
    for how, by_run in found.items():
        for label, values in by_run.items():
            spread = (max(values) - min(values)) / statistics.mean(values)
            rows.append(f"| {how} | {label} | {' / '.join(f'{v:.3f}' for v in values)} | {100 * spread:.1f} % |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="project whose artifacts/ hold the trained models")
    ap.add_argument("--runs", nargs="+", required=True, help="labels of evaluate.runs; the first is the reference")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_params(args.root / "params.yaml")
    p = params.evaluate
    by_label = {r.label: r for r in p.runs}
    missing = [label for label in args.runs if label not in by_label]
    if missing:
        raise SystemExit(f"--runs {missing}: not in {args.root / 'params.yaml'} evaluate.runs ({sorted(by_label)})")
    runs = [by_label[label] for label in args.runs]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext(name="evaluate", params=params, root=args.root, out_dir=Path(tmp), checkpoint_dir=Path(tmp),
                           fingerprint="bench", tracker=None)
        models = evaluate.Models(ctx, evaluate.load_test_set(args.root, p), torch.device("cpu"), runs[0].stage)
        found = speedups(models, runs, runs[0], p.latency_repeats, args.trials, Path(tmp))
    print(f"# {args.root}: {args.trials} trials, median of {p.latency_repeats} after a warm-up, "
          f"{args.threads} threads\n")
    print(table(found))
    return found


if __name__ == "__main__":
    main()
