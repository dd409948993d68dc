"""Timing, for the benchmark step: warm-up, then timed runs of one bound inference; mean ± std and percentiles.

Variants are timed in rounds, taken in turn, not one after the other: on a shared machine a slow
patch (a noisy neighbour, a throttled core) then falls on every variant alike instead of on
whichever was being timed, so speedups measured in one run compare like with like.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from optimizer.api.results import Latency


def summarize(samples_ms: np.ndarray, sizes: list[int] | None = None) -> Latency:
    """Mean ± std and percentiles; with `sizes`, the samples came in rounds of those sizes."""
    p50, p90, p99 = np.percentile(samples_ms, [50, 90, 99])
    sizes = sizes or [int(samples_ms.size)]
    bounds = np.cumsum([0, *sizes])
    return Latency(
        mean=float(samples_ms.mean()), std=float(samples_ms.std(ddof=1) if samples_ms.size > 1 else 0.0),
        p50=float(p50), p90=float(p90), p99=float(p99), runs=int(samples_ms.size), rounds=len(sizes),
        roundMeans=[float(samples_ms[a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:])],
    )


def speedup_range(baseline: Latency, candidate: Latency) -> list[float] | None:
    """Lowest and highest speedup over rounds timed at the same moment: how much the machine's
    noise moves the ratio (None unless both were timed in the same rounds)."""
    if baseline.rounds < 2 or len(baseline.roundMeans) != len(candidate.roundMeans):
        return None
    ratios = [b / c for b, c in zip(baseline.roundMeans, candidate.roundMeans)]
    return [min(ratios), max(ratios)]


def round_sizes(runs: int, rounds: int) -> list[int]:
    """`runs` split into at most `rounds` near-equal parts (never an empty round)."""
    rounds = max(1, min(rounds, runs))
    return [runs // rounds + (1 if index < runs % rounds else 0) for index in range(rounds)]


def steps(count: int, warmup: int, runs: int, rounds: int) -> int:
    """Calls measure_interleaved makes for `count` variants (for progress bars)."""
    rewarm = min(1, warmup) * (len(round_sizes(runs, rounds)) - 1)
    return count * (warmup + runs + rewarm)


def measure_interleaved(calls: dict[object, Callable[[], object]], warmup: int, runs: int, rounds: int,
                        on_run: Callable[[], None] | None = None) -> dict[object, Latency]:
    """Time every call `runs` times, in `rounds` rounds taken in turn.

    Each call gets `warmup` untimed runs before its first round, and one more before each later
    round: the calls timed in between have used the caches since.
    """
    samples: dict[object, list[float]] = {name: [] for name in calls}
    sizes = round_sizes(runs, rounds)
    for index, size in enumerate(sizes):
        for name, call in calls.items():
            for _ in range(warmup if index == 0 else min(1, warmup)):
                call()
                if on_run:
                    on_run()
            for _ in range(size):
                start = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - start) * 1000.0)
                if on_run:
                    on_run()
    return {name: summarize(np.asarray(values), sizes) for name, values in samples.items()}


def measure(run_once: Callable[[], object], warmup: int, runs: int, on_run: Callable[[], None] | None = None) -> Latency:
    """Time `runs` calls after `warmup` untimed ones; `on_run` advances a progress bar."""
    return measure_interleaved({"only": run_once}, warmup, runs, 1, on_run)["only"]
