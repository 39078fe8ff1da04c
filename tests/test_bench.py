"""The benchmark programs run end to end on a CPU at tiny sizes and print the tables they promise."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():  # the benchmarks set torch's thread count
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tables(out: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every Markdown table in `out`, as lists of stripped cells."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    found = []
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            found.append((cells[i - 1], []))
        elif found and not (i + 1 < len(lines) and lines[i + 1].startswith("|---")):
            found[-1][1].append(cells[i])
    return found


def test_latency_times_the_four_models_and_the_upmixer(tmp_path: Path, capsys):
    latency = bench_module("latency")
    latency.main(["--arch", "demo", "--steps", "2", "--few-steps", "1", "--measure-steps", "1", "--seconds", "0.5",
                  "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "rows.json")])
    (header, rows), (upmixer_header, upmixer_rows) = tables(capsys.readouterr().out)
    assert header == ["arch", "device", "compile", "model", "sampler, guidance", "steps", "NFE", "blocks/step",
                      "text ms (cached)", "sampling ms", "decode ms", "total ms", "RTF", "speed-up", "note"]
    by_model = {row[3]: dict(zip(header, row)) for row in rows}
    assert list(by_model) == ["base", "presto_s", "presto_l", "presto_ls"]
    assert [by_model[m]["NFE"] for m in by_model] == ["4", "1", "4", "1"]  # CFG++ counts two per step
    assert by_model["base"]["speed-up"] == "1.00x"
    assert by_model["base"]["note"] == by_model["presto_l"]["note"] == "sampling scaled from 1 step(s)"
    assert by_model["presto_s"]["note"] == ""
    assert float(by_model["presto_l"]["blocks/step"]) < float(by_model["base"]["blocks/step"]) == 4.0
    assert upmixer_header == ["arch", "device", "compile", "audio", "upmixer M params", "upmix ms", "RTF"]
    assert upmixer_rows[0][3] == "0.5 s at 16000 Hz"
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert len(saved["models"]) == 4 and saved["upmixer"][0]["seconds"] == 0.5


def test_train_throughput_reports_tokens_mfu_and_the_data_share(capsys):
    throughput = bench_module("train_throughput")
    throughput.main(["--arch", "demo", "--steps", "2", "--warmup", "1", "--batch", "2", "--frames", "8",
                     "--clips", "4", "--threads", "1", "--peak-tflops", "1"])
    [(header, rows)] = tables(capsys.readouterr().out)
    assert header == ["arch", "device", "precision", "DiT", "batch x frames", "data ms", "compute ms", "data share",
                      "steps/s", "tokens/s", "TFLOP/s", "MFU (peak)"]
    row = dict(zip(header, rows[0]))
    assert row["precision"] == "float32" and row["batch x frames"] == "2 x 8"
    assert float(row["tokens/s"]) > 0 and row["MFU (peak)"].endswith("% (1)")


def test_layer_sensitivity_ratios_see_exactly_the_blocks_a_budget_drops():
    """With every block but block 1 the identity (adaLN-Zero's zero gates, and a zeroed cross-attention output,
    which is ungated) and the output layer given weights, only the budgets that leave block 1 out change the
    loss: reroute 2 (blocks 0 and 3), and no exit budget."""
    from presto.distill.presto_l import BudgetSchedule, BudgetScheduleConfig
    from presto.models.dit import DiT, DiTConfig
    from presto.text.condition import TextCondition

    sens = bench_module("layer_sensitivity")
    torch.manual_seed(0)
    net = DiT(DiTConfig(latent_channels=4, width=32, depth=4, heads=2, mlp_ratio=2.0, text_dim=8,
                           budget_conditioning=False))
    with torch.no_grad():
        for module in (net.blocks[1], net.final):
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        for i in (0, 2, 3):
            net.blocks[i].cross_out.weight.zero_()
            net.blocks[i].cross_out.bias.zero_()
    cond = TextCondition(torch.randn(3, 2, 8), torch.ones(3, 2, dtype=torch.bool), torch.randn(3, 8))
    levels = [20.0, 1.0, 0.1]
    ratios = sens.loss_ratios(net, 0.5, [(torch.randn(3, 4, 16), cond)], levels, seed=0)
    assert sorted(ratios) == [("exit", 2), ("exit", 3), ("reroute", 2), ("reroute", 3)]
    for key in [("exit", 2), ("exit", 3), ("reroute", 3)]:
        assert ratios[key] == pytest.approx([1.0] * 3, abs=1e-6)
    assert all(abs(r - 1.0) > 1e-3 for r in ratios["reroute", 2])

    # A schedule is scored over a grid's levels: full depth counts 1, a budget its measured ratio.
    schedule = BudgetSchedule(BudgetScheduleConfig(reference_depth=4, budgets=[4, 2], sigma_bounds=[5.0]), 4,
                              reroute=True)
    fraction, mean = sens.score_schedule(schedule, torch.tensor([20.0, 1.0, 0.1, 0.0]), levels, ratios)
    assert fraction == pytest.approx((2 + 4 + 4) / 12)
    assert mean == pytest.approx((ratios["reroute", 2][0] + 2) / 3)
    assert sens.parse_schedule("28,24@1.5").budgets == [28, 24]


def test_eval_timing_repeats_both_ways_of_timing(tmp_path: Path, capsys):
    from test_evaluate import make_artifacts, tiny_params

    make_artifacts(tmp_path)
    raw = tiny_params(latency_repeats=1).model_dump(mode="json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    found = bench_module("eval_timing").main(["--root", str(tmp_path), "--runs", "base/3", "ase/3", "--trials", "2",
                                              "--threads", "1"])
    # The reference over itself, every way.
    for how in ("paired", "paired, ratio of medians", "separate"):
        assert found[how]["base/3"] == [1.0, 1.0]
    assert all(math.isnan(v) for v in found["paired: speedup_vs_base_std"]["ase/3"])  # one round: no error
    assert all(len(v) == 2 and min(v) > 0 for how, by_run in found.items() if how != "paired: speedup_vs_base_std"
               for v in by_run.values())
    # With one round the median of the rounds' ratios is the ratio of the medians.
    assert found["paired"]["ase/3"] == pytest.approx(found["paired, ratio of medians"]["ase/3"])
    ((header, rows),) = tables(capsys.readouterr().out)
    assert header == ["timing", "run", "speed-up per trial", "spread", "sd"]
    assert [r[:2] for r in rows] == [[how, label] for how in found for label in ("base/3", "ase/3")]
    # Comparisons: the pair's ratio taken directly and through the reference run, each trial.
    found = bench_module("eval_timing").main(["--root", str(tmp_path), "--runs", "base/3", "--pairs",
                                              "ase/3,presto_s/2", "--trials", "2", "--threads", "1"])
    assert list(found) == ["pair, 3 rounds", "pair, 3 rounds: latency_ratio_std", "via reference, 1 rounds"]
    for by_pair in found.values():
        assert list(by_pair) == ["ase/3 vs presto_s/2"] and len(by_pair["ase/3 vs presto_s/2"]) == 2
        assert min(by_pair["ase/3 vs presto_s/2"]) >= 0
    ((header, rows),) = tables(capsys.readouterr().out)
    assert header == ["timing", "pair", "latency ratio per trial", "spread", "sd"]
    assert [r[0] for r in rows] == list(found)
    with pytest.raises(SystemExit, match="two run labels"):
        bench_module("eval_timing").main(["--root", str(tmp_path), "--runs", "base/3", "--pairs", "ase/3"])
