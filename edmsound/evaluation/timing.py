"""Side-by-side generation timing: several models or settings measured in one run, round-robin, so a change in the
machine's load reaches every one of them alike."""
from __future__ import annotations

import time

import numpy as np

STATISTICS = {"best": min, "median": lambda v: float(np.median(v))}


def seconds_per_clip(calls: dict, n: int = 8, rounds: int = 3, statistic: str = "best") -> dict:
    """Seconds per clip of each call ``key -> (pipe, class_name, generate options)``: after one warm-up call each,
    ``rounds`` passes that call every one in turn with ``n`` clips; per key the fastest pass (``"best"``: the least
    disturbed by other load) or the ``"median"`` pass."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(STATISTICS)}, got {statistic!r}")
    for pipe, cls, options in calls.values():
        pipe.generate(cls, n=2, seed=1, **options)                              # warm-up
    times = {k: [] for k in calls}
    for r in range(rounds):
        for k, (pipe, cls, options) in calls.items():
            t0 = time.perf_counter()
            pipe.generate(cls, n=n, seed=2 + r, **options)
            times[k].append((time.perf_counter() - t0) / n)
    return {k: float(STATISTICS[statistic](v)) for k, v in times.items()}
