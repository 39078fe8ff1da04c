"""The benchmark programs run end to end on a CPU at tiny sizes and print the tables they promise."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

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
