"""The serving sweep: how many requests per second one pod sustains within a p99 latency bound.

perf_analyzer's concurrency mode, in process: `c` streams, each a Python thread with its own
session (ONNX Runtime and OpenVINO release the GIL while they run), send requests back to back
for `secondsPerPoint` after a short warm-up, in three windows that must agree within 10% (else up
to three more, perf_analyzer's stability rule). A request counts in the window it completes in, so
the windows' edges bias nothing; its latency is its call's time. Per concurrency, the threads per
stream are chosen by measurement (1, 2, 4, … while streams × threads fit the CPUs), then, where
the model has a dynamic batch axis, batches of 2/4/8 requests per call are tried at those threads
(a server's dynamic batcher; every request in a call waits the whole call). The sweep stops when
p99 passes the SLO at two concurrencies in a row or throughput stops rising.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from optimizer.api.results import ServingCurve, ServingPoint
from optimizer.engines.feeds import random_feed
from optimizer.engines.runners import Runner, torch_threads

DYNAMIC_BATCHES = (2, 4, 8)
# perf_analyzer's stability rule: the last 3 windows' rates and mean latencies within 10% of each other.
WINDOWS, STABILITY = 3, 0.10
MAX_WINDOWS = 2 * WINDOWS  # then the last 3 are taken as they are, and the point says it was unstable
RISE = 1.02  # a concurrency that adds less than 2% requests/s is noise on a shared machine, not a gain
# Runtimes whose one model object cannot serve concurrent streams: a captured CUDA graph replays into
# the same static tensors, so two streams would overwrite each other's inputs.
NOT_CONCURRENT = {"pytorch-cudagraph": "a captured CUDA graph replays into one set of static tensors, so "
                                       "concurrent streams would overwrite each other's inputs"}


def cannot_meet(alone_p99_ms: float, slo_ms: float) -> str:
    return (f"cannot meet: one request alone takes {alone_p99_ms:.3g} ms at p99 on this pod, the SLO is "
            f"{slo_ms:g} ms (raise benchmark.serving.latencySLOMs or pick a faster target)")


def session_cap(model_bytes: int, available: int | None) -> int | None:
    """How many streams' sessions of a model fit in half the memory this pod has left (each holds its
    weights, their prepacked copy and its activations); None where the memory left is unknown."""
    if available is None:
        return None
    return max(1, int(available * 0.5 // (2 * model_bytes + 16 * 2**20)))


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

    def capped(self, streams: int | None) -> "SweepPlan":
        if streams is None or streams >= self.max_concurrency:
            return self
        return dataclasses.replace(self, max_concurrency=streams)

    @property
    def warmup(self) -> float:
        return min(1.0, max(0.2, self.seconds / 4))

    def most_points(self) -> int:
        """An upper bound on the points of one variant's sweep (for progress bars)."""
        return sum(len(thread_choices(c, self.cpus)) + len(self.batches) - 1
                   for c in range(1, self.max_concurrency + 1))


@dataclass
class Load:
    latencies: np.ndarray  # ms, of the calls completed in the last WINDOWS windows
    seconds: float  # how long those windows lasted together
    stable: bool  # whether their rates and mean latencies agreed within STABILITY
    every: np.ndarray  # ms, of every call (for a point whose calls are longer than a window)


def _windows(done: list[list[tuple[float, float]]], start: float, length: float, count: int) -> list[np.ndarray]:
    """The latencies of the calls that completed in each of `count` windows of `length` from `start`."""
    ended = [item for stream in done for item in list(stream)]  # list(): a snapshot while streams append
    return [np.asarray([ms for end, ms in ended if start + i * length <= end < start + (i + 1) * length])
            for i in range(count)]


def _agree(windows: list[np.ndarray], tolerance: float) -> bool:
    counts = [w.size for w in windows]
    if min(counts) == 0:
        return False
    means = [float(w.mean()) for w in windows]
    return max(counts) <= min(counts) * (1 + tolerance) and max(means) <= min(means) * (1 + tolerance)


def run_load(calls: list[Callable[[], object]], window: float, warmup: float) -> Load:
    """Each call in its own thread, back to back: `warmup`, then windows of `window` seconds until the
    last WINDOWS agree on rate and mean latency within STABILITY, or MAX_WINDOWS have passed
    (perf_analyzer's stability rule: a neighbour that takes a core for a second moves one window, not
    the point). A call counts in the window it completes in, so a window's edges bias nothing."""
    barrier = threading.Barrier(len(calls) + 1)
    stop = threading.Event()
    done: list[list[tuple[float, float]]] = [[] for _ in calls]  # per stream: (completed at, ms)
    errors: list[BaseException] = []

    def stream(index: int, call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            while not stop.is_set():
                started = time.perf_counter()
                call()
                ended = time.perf_counter()
                done[index].append((ended, (ended - started) * 1000.0))
        except BaseException as error:  # re-raised in the caller's thread
            errors.append(error)
            stop.set()

    threads = [threading.Thread(target=stream, args=(i, call), daemon=True) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    start = time.perf_counter() + warmup
    barrier.wait()
    count, stable = 0, False
    while not errors and count < MAX_WINDOWS and not stable:
        count += 1
        time.sleep(max(0.0, start + count * window - time.perf_counter()))
        stable = count >= WINDOWS and _agree(_windows(done, start, window, count)[-WINDOWS:], STABILITY)
    stop.set()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    last = _windows(done, start, window, count)[-WINDOWS:]
    return Load(latencies=np.concatenate(last), seconds=WINDOWS * window, stable=stable,
                every=np.asarray([ms for stream in done for _, ms in stream]))


@dataclass
class _Streams:
    """Sessions with t threads each, made as the sweep needs them and reused between points."""

    runner: Runner
    inputs: list
    by_threads: dict[int, list[Runner]] = field(default_factory=dict)
    feeds: dict[int, dict] = field(default_factory=dict)

    def keep_only(self, threads: list[int]) -> None:
        """Release the sessions of thread counts the sweep will not use again."""
        for count in [t for t in self.by_threads if t not in threads]:
            del self.by_threads[count]

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
        load = run_load(calls, plan.seconds / WINDOWS, plan.warmup)
    latencies = load.latencies if load.latencies.size else load.every
    p50, p90, p99 = (float(x) for x in np.percentile(latencies, [50, 90, 99]))
    return ServingPoint(concurrency=concurrency, threadsPerStream=threads, batch=batch,
                        requestsPerSecond=batch * load.latencies.size / load.seconds, meanMs=float(latencies.mean()),
                        p50Ms=p50, p90Ms=p90, p99Ms=p99, requests=batch * int(load.latencies.size), stable=load.stable)


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
        streams.keep_only(thread_choices(concurrency + 1, plan.cpus))
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
