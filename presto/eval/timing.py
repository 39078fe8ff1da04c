"""Timing things against each other on a machine whose speed drifts: they take turns, and are compared round
by round."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist
from typing import TypeVar

import numpy as np

T = TypeVar("T")
NORMAL_IQR = 2 * NormalDist().inv_cdf(0.75)  # a normal distribution's interquartile range in standard deviations


def take_turns(calls: Mapping[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Per name, the results of its `rounds` calls, made in rounds of one call per name (in the mapping's
    order): a change in the machine's load between rounds slows every name alike, so the ratio of two names'
    medians holds where separately timed medians would not."""
    results: dict[str, list[T]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            results[name].append(call())
    return results


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None]:
    """How many times longer a takes than b, from times a_i, b_i taken in the same rounds: the median of the
    rounds' ratios a_i / b_i, and its standard error (None from one round).

    Each round's ratio cancels the load of its moment, and the median ignores a round hit by a one-off stall.
    The standard error is the median's large-sample one, sqrt(pi / 2) * s / sqrt(n), with the spread s of the
    ratios taken as their interquartile range / 1.349 so that the stall does not inflate it either (both hold
    for normally distributed ratios as the rounds grow)."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"paired_ratio needs as many times of a as of b, at least one: got {len(a)} and {len(b)}")
    ratios = np.asarray(a, dtype=np.float64) / np.asarray(b, dtype=np.float64)
    if len(ratios) < 2:
        return float(ratios[0]), None
    q1, q3 = np.percentile(ratios, [25, 75])
    return float(np.median(ratios)), float(math.sqrt(math.pi / 2) * (q3 - q1) / NORMAL_IQR / math.sqrt(len(ratios)))
