"""Timing things against each other on a machine whose speed drifts: they take turns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

T = TypeVar("T")


def take_turns(calls: Mapping[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Per name, the results of its `rounds` calls, made in rounds of one call per name (in the mapping's
    order): a change in the machine's load between rounds slows every name alike, so the ratio of two names'
    medians holds where separately timed medians would not."""
    results: dict[str, list[T]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            results[name].append(call())
    return results
