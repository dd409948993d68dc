"""Timing, for the benchmark step: warm-up, then timed runs of one bound inference; mean ± std and percentiles.

Variants are timed in rounds, taken in turn, not one after the other: on a shared machine a slow
patch (a noisy neighbour, a throttled core) then falls on every variant alike instead of on
whichever was being timed, so speedups measured in one run compare like with like.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from optimizer.api.results import Latency


def relative_precision(samples_ms: np.ndarray) -> float | None:
    """95% confidence half-width of the mean over the mean (Student's t); None below 2 samples."""
    if samples_ms.size < 2 or samples_ms.mean() <= 0:
        return None
    from scipy import stats

    half_width = stats.t.ppf(0.975, samples_ms.size - 1) * samples_ms.std(ddof=1) / np.sqrt(samples_ms.size)
    return float(half_width / samples_ms.mean())


def summarize(samples_ms: np.ndarray, sizes: list[int] | None = None, stopped_by: str = "runs") -> Latency:
    """Mean ± std and percentiles; with `sizes`, the samples came in rounds of those sizes."""
    p50, p90, p99 = np.percentile(samples_ms, [50, 90, 99])
    sizes = sizes or [int(samples_ms.size)]
    bounds = np.cumsum([0, *sizes])
    return Latency(
        mean=float(samples_ms.mean()), std=float(samples_ms.std(ddof=1) if samples_ms.size > 1 else 0.0),
        p50=float(p50), p90=float(p90), p99=float(p99), runs=int(samples_ms.size), rounds=len(sizes),
        roundMeans=[float(samples_ms[a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:])],
        precision=relative_precision(samples_ms), stoppedBy=stopped_by,
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


@dataclass(frozen=True)
class Budget:
    """When a variant's timing may stop before `runs`: seconds of timed runs, and a target precision."""

    seconds: float = float("inf")
    precision: float | None = None  # relative 95% half-width of the mean
    minimum_per_round: int = 2  # runs per round once precise enough: every round keeps a mean


def measure_interleaved(calls: dict[object, Callable[[], object]], warmup: int, runs: int, rounds: int,
                        on_run: Callable[[], None] | None = None, budget: Budget = Budget()) -> dict[object, Latency]:
    """Time every call up to `runs` times, in `rounds` rounds taken in turn.

    Each call gets `warmup` untimed runs before its first round (stopped once they took a quarter of
    the budget), and one more before each later round: the calls timed in between have used the
    caches since. A call's runs in a round stop at the round's share of `budget.seconds` (after at
    least one), or at `budget.minimum_per_round` once its mean is known to `budget.precision`.
    `on_run` is called once per planned run, skipped ones included, so a progress bar ends full.
    """
    samples: dict[object, list[float]] = {name: [] for name in calls}
    taken: dict[object, list[int]] = {name: [] for name in calls}
    stopped: dict[object, str] = {name: "runs" for name in calls}
    sizes = round_sizes(runs, rounds)
    share = budget.seconds / len(sizes)
    for index, size in enumerate(sizes):
        for name, call in calls.items():
            warm_start = time.perf_counter()
            planned_warmup = warmup if index == 0 else min(1, warmup)
            for done in range(planned_warmup):
                if done and time.perf_counter() - warm_start > budget.seconds / 4:
                    break
                call()
            round_start, count = time.perf_counter(), 0
            for count in range(1, size + 1):
                start = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - start) * 1000.0)
                if count < size and time.perf_counter() - round_start > share:
                    stopped[name] = "timeBudget"
                    break
                if count >= budget.minimum_per_round and budget.precision is not None and count < size:
                    precision = relative_precision(np.asarray(samples[name]))
                    if precision is not None and precision <= budget.precision:
                        stopped[name] = "targetPrecision" if stopped[name] == "runs" else stopped[name]
                        break
            taken[name].append(count)
            if on_run:
                for _ in range(planned_warmup + size):
                    on_run()
    return {name: summarize(np.asarray(values), taken[name], stopped[name]) for name, values in samples.items()}


def measure(run_once: Callable[[], object], warmup: int, runs: int, on_run: Callable[[], None] | None = None) -> Latency:
    """Time `runs` calls after `warmup` untimed ones; `on_run` advances a progress bar."""
    return measure_interleaved({"only": run_once}, warmup, runs, 1, on_run)["only"]
