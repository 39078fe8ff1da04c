"""presto.eval.timing.take_turns: rounds of one call per name, so a change in the machine's speed between
rounds reaches every name alike."""

from __future__ import annotations

import statistics

from presto.eval.timing import take_turns


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
