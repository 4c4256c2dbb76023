"""Counters instead of prints: every task counts what it did, the driver sums the counts.

A stats dict maps a counter name to a number. Names are dotted (`rejected.decode_error`) so a summary
can group them. Integers stay integers after merging, so merged files diff cleanly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

Stats = Counter  # str -> int | float


def merge_stats(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: Counter = Counter()
    for part in parts:
        for key, value in part.items():
            total[key] += value
    return {key: total[key] for key in sorted(total)}


def grouped(stats: Mapping[str, float], prefix: str) -> dict[str, float]:
    """The counters under `prefix.` with the prefix removed, e.g. rejects by reason."""
    head = prefix + "."
    return {key[len(head) :]: value for key, value in stats.items() if key.startswith(head)}
