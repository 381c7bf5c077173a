"""Straggler detection from heartbeats: ranks whose step time is well above their peers' median."""
from __future__ import annotations

import statistics
from typing import Iterable


def find_stragglers(heartbeats: Iterable[dict], ratio: float = 1.5) -> list[tuple[int, float, float]]:
    """(rank, step_time, median) of every rank slower than ratio x the median of its peers, slowest first.

    Peers are the ranks of the same teacher group when heartbeats carry a `group` key (a SAM rank and a
    CLIP rank legitimately differ), else all ranks. Heartbeats without a positive step_time are ignored.
    """
    if ratio <= 1.0:
        raise ValueError(f"straggler ratio {ratio}: must be > 1")
    by_group: dict[object, list[tuple[int, float]]] = {}
    for hb in heartbeats:
        t = hb.get("step_time")
        if isinstance(t, (int, float)) and t > 0:
            by_group.setdefault(hb.get("group"), []).append((int(hb["rank"]), float(t)))
    found = []
    for members in by_group.values():
        if len(members) < 2:  # a rank alone is nobody's straggler
            continue
        median = statistics.median(t for _, t in members)
        found += [(rank, t, median) for rank, t in members if t > ratio * median]
    return sorted(found, key=lambda s: s[1] / s[2], reverse=True)
