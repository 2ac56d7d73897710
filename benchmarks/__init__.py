"""Speed benchmarks: each module prints ratios measured in one run (``python -m benchmarks`` runs all)."""

from __future__ import annotations

import time
from collections.abc import Callable


def cpu_seconds(fn: Callable[[], object], rounds: int, warmup: bool = True) -> float:
    """Best process-CPU time of ``fn`` over ``rounds`` calls (after one warm-up call if ``warmup``):
    the stabler number on a shared machine."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(rounds):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best
