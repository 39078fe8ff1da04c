"""presto.eval.timing: take_turns makes rounds of one call per name, so a change in the machine's speed between
rounds reaches every name alike; paired_ratio compares two names round by round."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from presto.eval.timing import paired_ratio, take_turns


def test_names_take_turns_in_rounds():
    order = []
    out = take_turns({"a": lambda: order.append("a") or len(order), "b": lambda: order.append("b") or len(order)},
                     rounds=3)
    assert order == ["a", "b"] * 3
    assert out == {"a": [1, 3, 5], "b": [2, 4, 6]}


def test_ratio_of_medians_survives_a_machine_that_slows_down():
    # Two jobs of 100 and 25 units on a machine that runs at full speed for the first 4 calls and at a third of
    # it after (another process started). Taking turns, both see the same mix of speeds.
    calls = 0

    def job(units: float):
        def run() -> float:
            nonlocal calls
            calls += 1
            return units * (1.0 if calls <= 4 else 3.0)
        return run

    out = take_turns({"ref": job(100.0), "fast": job(25.0)}, rounds=5)
    assert statistics.median(out["ref"]) / statistics.median(out["fast"]) == 4.0
    # Timed one after the other, the same machine makes the ratio 4 / 3.
    calls = 0
    ref, fast = [job(100.0)() for _ in range(5)], [job(25.0)() for _ in range(5)]
    assert statistics.median(ref) / statistics.median(fast) == 4.0 / 3.0


def test_paired_ratio_cancels_the_load_of_each_round_and_ignores_a_stall():
    rng = np.random.default_rng(0)
    load = rng.uniform(1.0, 10.0, size=15)  # the machine's slowness, round by round
    b = 40.0 * load
    a = 30.0 * load
    assert paired_ratio(a, b) == (pytest.approx(0.75), 0.0)
    a[3] *= 20  # one call of a stalls
    ratio, std = paired_ratio(a, b)
    assert ratio == pytest.approx(0.75) and std == 0.0
    # Their medians, taken apart, keep the load: the ratio of medians is off.
    assert np.median(a) / np.median(b) != pytest.approx(0.75, abs=0.01)


def test_paired_ratio_standard_error_matches_the_medians_spread():
    # Normal ratios around 0.9 (sd 0.04) over 25 rounds: the large-sample standard error of the median is
    # sqrt(pi / 2) * 0.04 / 5 = 0.01003. The estimate, averaged over many experiments, and the spread of the
    # medians across them both land on it.
    rng = np.random.default_rng(1)
    n, sd, trials = 25, 0.04, 4000
    ratios = 0.9 + sd * rng.standard_normal((trials, n))
    b = rng.uniform(50.0, 150.0, size=(trials, n))
    out = np.array([paired_ratio(r * t, t) for r, t in zip(ratios, b)])
    expected = math.sqrt(math.pi / 2) * sd / math.sqrt(n)
    assert out[:, 0].mean() == pytest.approx(0.9, abs=1e-3)
    assert out[:, 0].std() == pytest.approx(expected, rel=0.08)
    assert out[:, 1].mean() == pytest.approx(expected, rel=0.08)


def test_paired_ratio_of_one_round_has_no_spread_and_refuses_unpaired_times():
    assert paired_ratio([3.0], [2.0]) == (1.5, None)
    with pytest.raises(ValueError, match="as many times"):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        paired_ratio([], [])
