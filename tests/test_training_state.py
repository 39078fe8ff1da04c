"""Training state survives a restart exactly: resuming gives the same trajectory as never stopping."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from presto.errors import DivergenceError
from presto.training.progress import Progress, check_finite, format_duration
from presto.training.state import latest_state, load_state, save_state


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    return model, opt


def _steps(model, opt, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        x = torch.randn(16, 4)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    model, opt = _setup()
    straight = _steps(model, opt, 10)

    model, opt = _setup()
    first = _steps(model, opt, 5)
    save_state(tmp_path, 5, {"model": model}, {"opt": opt}, extra={"ema_decay": 0.999})
    model2, opt2 = _setup(seed=123)  # a fresh process: different init
    step, extra = load_state(latest_state(tmp_path), {"model": model2}, {"opt": opt2})
    assert step == 5 and extra == {"ema_decay": 0.999}
    rest = _steps(model2, opt2, 5)
    assert first + rest == pytest.approx(straight, rel=1e-6)
    assert isinstance(opt2.param_groups[0]["betas"], tuple)


def test_keeps_newest_states_and_ignores_half_written(tmp_path: Path) -> None:
    model, opt = _setup()
    for step in (1, 2, 3):
        save_state(tmp_path, step, {"model": model}, {"opt": opt}, keep=2)
    (tmp_path / "step-00000009").mkdir()  # a crash before meta.json was written
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003", "step-00000009"]
    assert latest_state(tmp_path).name == "step-00000003"
    meta = json.loads((tmp_path / "step-00000003" / "meta.json").read_text())
    assert meta["step"] == 3


def test_latest_state_of_missing_folder_is_none(tmp_path: Path) -> None:
    assert latest_state(tmp_path / "nothing") is None


def test_check_finite_names_the_value() -> None:
    check_finite(3, loss=1.0)
    with pytest.raises(DivergenceError, match=r"step 7: loss = nan"):
        check_finite(7, loss=float("nan"), other=1.0)


def test_progress_line_has_rate_and_eta() -> None:
    out = io.StringIO()
    p = Progress("train", total=100, every_s=0, stream=out)
    p._t0 -= 10  # ten seconds ago
    p.update(50, loss=0.5)
    line = out.getvalue()
    assert "step 50/100 (50%)" in line and "5.00 step/s" in line and "ETA 0m10s" in line and "loss=0.5" in line
    assert format_duration(3725) == "1h02m"
