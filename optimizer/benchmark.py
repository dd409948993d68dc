"""Step 5, benchmark: warm-up, then N timed runs of one bound inference; mean ± std and percentiles."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from optimizer.results import Latency


def summarize(samples_ms: np.ndarray) -> Latency:
    p50, p90, p99 = np.percentile(samples_ms, [50, 90, 99])
    return Latency(
        mean=float(samples_ms.mean()), std=float(samples_ms.std(ddof=1) if samples_ms.size > 1 else 0.0),
        p50=float(p50), p90=float(p90), p99=float(p99), runs=int(samples_ms.size),
    )


def measure(run_once: Callable[[], object], warmup: int, runs: int, on_run: Callable[[], None] | None = None) -> Latency:
    """Time `runs` calls after `warmup` untimed ones; `on_run` advances a progress bar."""
    for _ in range(warmup):
        run_once()
        if on_run:
            on_run()
    samples = np.empty(runs)
    for index in range(runs):
        start = time.perf_counter()
        run_once()
        samples[index] = (time.perf_counter() - start) * 1000.0
        if on_run:
            on_run()
    return summarize(samples)
