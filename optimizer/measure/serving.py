"""The serving sweep: how many requests per second one pod sustains within a p99 latency bound.

perf_analyzer's concurrency mode, in process: `c` streams, each a Python thread with its own
session (ONNX Runtime and OpenVINO release the GIL while they run), send requests back to back
for `seconds` after a short warm-up. A request counts when it completes inside the window, so the
window's edges bias nothing; its latency is its call's time. Per concurrency, the threads per
stream are chosen by measurement (1, 2, 4, … while streams × threads fit the CPUs), then, where
the model has a dynamic batch axis, batches of 2/4/8 requests per call are tried at those threads
(a server's dynamic batcher; every request in a call waits the whole call). The sweep stops when
p99 passes the SLO at two concurrencies in a row or throughput stops rising.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from optimizer.api.results import ServingCurve, ServingPoint
from optimizer.engines.feeds import random_feed
from optimizer.engines.runners import Runner, torch_threads

DYNAMIC_BATCHES = (2, 4, 8)
RISE = 1.02  # a concurrency that adds less than 2% requests/s is noise on a shared machine, not a gain
# Runtimes whose one model object cannot serve concurrent streams: a captured CUDA graph replays into
# the same static tensors, so two streams would overwrite each other's inputs.
NOT_CONCURRENT = {"pytorch-cudagraph": "a captured CUDA graph replays into one set of static tensors, so "
                                       "concurrent streams would overwrite each other's inputs"}


def cannot_meet(alone_p99_ms: float, slo_ms: float) -> str:
    return (f"cannot meet: one request alone takes {alone_p99_ms:.3g} ms at p99 on this pod, the SLO is "
            f"{slo_ms:g} ms (raise benchmark.serving.latencySLOMs or pick a faster target)")


def thread_choices(concurrency: int, cpus: int) -> list[int]:
    """Threads per stream worth trying: 1, 2, 4, … while concurrency × threads fit the CPUs (1 always:
    more streams than CPUs still run, oversubscribed)."""
    choices, threads = [1], 2
    while concurrency * threads <= cpus:
        choices.append(threads)
        threads *= 2
    return choices


@dataclass(frozen=True)
class SweepPlan:
    slo_ms: float
    cpus: int
    max_concurrency: int
    seconds: float  # of load per point, after the warm-up
    batches: tuple[int, ...] = (1,)

    @classmethod
    def of(cls, serving, cpus: int, batchable: bool) -> "SweepPlan":
        """From benchmark.serving (ServingSpec): maxConcurrency unset is twice the CPUs."""
        return cls(slo_ms=serving.latencySLOMs, cpus=cpus, max_concurrency=serving.maxConcurrency or 2 * cpus,
                   seconds=serving.secondsPerPoint, batches=(1, *DYNAMIC_BATCHES) if batchable else (1,))

    @property
    def warmup(self) -> float:
        return min(1.0, max(0.2, self.seconds / 4))

    def most_points(self) -> int:
        """An upper bound on the points of one variant's sweep (for progress bars)."""
        return sum(len(thread_choices(c, self.cpus)) + len(self.batches) - 1
                   for c in range(1, self.max_concurrency + 1))


def run_load(calls: list[Callable[[], object]], seconds: float, warmup: float) -> tuple[np.ndarray, np.ndarray]:
    """Each call in its own thread, back to back, for `warmup` then `seconds`. Returns the latencies
    (ms) of the calls that completed inside the timed window, and of every call (for a point whose
    calls are longer than the window)."""
    barrier = threading.Barrier(len(calls) + 1)
    window: dict[str, float] = {}
    inside: list[list[float]] = [[] for _ in calls]
    every: list[list[float]] = [[] for _ in calls]
    errors: list[BaseException] = []

    def stream(index: int, call: Callable[[], object]) -> None:
        barrier.wait()
        start_at, end_at = window["start"], window["end"]
        try:
            while (started := time.perf_counter()) < end_at:
                call()
                ended = time.perf_counter()
                every[index].append((ended - started) * 1000.0)
                if start_at <= ended <= end_at:
                    inside[index].append((ended - started) * 1000.0)
        except BaseException as error:  # re-raised in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=stream, args=(i, call), daemon=True) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    window["start"] = time.perf_counter() + warmup
    window["end"] = window["start"] + seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return np.asarray([x for xs in inside for x in xs]), np.asarray([x for xs in every for x in xs])


@dataclass
class _Streams:
    """Sessions with t threads each, made as the sweep needs them and reused between points."""

    runner: Runner
    inputs: list
    by_threads: dict[int, list[Runner]] = field(default_factory=dict)
    feeds: dict[int, dict] = field(default_factory=dict)

    def calls(self, concurrency: int, threads: int, batch: int) -> list[Callable[[], object]]:
        runners = self.by_threads.setdefault(threads, [])
        while len(runners) < concurrency:
            runners.append(self.runner.with_threads(threads))
        if batch not in self.feeds:
            self.feeds[batch] = random_feed(self.inputs, {s.name: [batch, *s.shape[1:]] for s in self.inputs})
        return [runner.bind(self.feeds[batch]) for runner in runners[:concurrency]]


def measure_point(streams: _Streams, concurrency: int, threads: int, batch: int, plan: SweepPlan) -> ServingPoint:
    calls = streams.calls(concurrency, threads, batch)
    # ONNX Runtime and OpenVINO fix their threads per session; PyTorch reads torch's count per call.
    with torch_threads(threads) if streams.runner.runtime.startswith("pytorch") else contextlib.nullcontext():
        inside, every = run_load(calls, plan.seconds, plan.warmup)
    latencies = inside if inside.size else every
    mean = float(latencies.mean())
    p50, p90, p99 = (float(x) for x in np.percentile(latencies, [50, 90, 99]))
    return ServingPoint(concurrency=concurrency, threadsPerStream=threads, batch=batch,
                        requestsPerSecond=batch * inside.size / plan.seconds, meanMs=mean, p50Ms=p50, p90Ms=p90,
                        p99Ms=p99, requests=batch * int(inside.size))


def _level(streams: _Streams, concurrency: int, plan: SweepPlan,
           on_point: Callable[[ServingPoint], None]) -> list[ServingPoint]:
    """One concurrency: each thread count at batch 1, then larger batches at the best one, while p99
    stays within the SLO (a larger batch only takes longer)."""
    points = []
    for threads in thread_choices(concurrency, plan.cpus):
        points.append(measure_point(streams, concurrency, threads, 1, plan))
        on_point(points[-1])
    threads = max(points, key=lambda p: p.requestsPerSecond).threadsPerStream
    for batch in plan.batches[1:]:
        if points[-1].p99Ms > plan.slo_ms:
            break
        points.append(measure_point(streams, concurrency, threads, batch, plan))
        on_point(points[-1])
    return points


def sweep(variant: str, runner: Runner, inputs: list, plan: SweepPlan,
          on_point: Callable[[ServingPoint], None] = lambda point: None) -> ServingCurve:
    """One variant's curve: every point measured, and the highest requests/s whose p99 is within the SLO."""
    if runner.runtime in NOT_CONCURRENT:
        return ServingCurve(variant=variant, reason=f"not swept: {NOT_CONCURRENT[runner.runtime]}")
    streams = _Streams(runner, list(inputs))
    points: list[ServingPoint] = []
    over, best = 0, 0.0
    for concurrency in range(1, plan.max_concurrency + 1):
        level = _level(streams, concurrency, plan, on_point)
        points += level
        if concurrency == 1:
            alone = min(p.p99Ms for p in level if p.batch == 1)
            if alone > plan.slo_ms:
                return ServingCurve(variant=variant, points=points, reason=cannot_meet(alone, plan.slo_ms))
        over = 0 if any(p.p99Ms <= plan.slo_ms for p in level) else over + 1
        most = max(p.requestsPerSecond for p in level)
        if over >= 2 or most <= best * RISE:
            break
        best = max(best, most)
    within = [p for p in points if p.p99Ms <= plan.slo_ms]
    return ServingCurve(variant=variant, points=points,
                        atSLO=max(within, key=lambda p: (p.requestsPerSecond, -p.p99Ms)))
