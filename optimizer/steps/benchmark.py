"""Benchmark: every model that built, timed on one shared input in interleaved rounds
(optimizer/measure/benchmark.py), against the baseline timed in the same rounds."""

from __future__ import annotations

from optimizer.api.results import VariantStatus
from optimizer.measure.benchmark import Budget, measure_interleaved, round_sizes, speedup_range, steps
from optimizer.engines.feeds import random_feed
from optimizer.steps.run import Run


def benchmark_step(run: Run) -> None:
    bench = run.spec.spec.benchmark
    feed = random_feed(run.loaded.inputs)  # one input, shared by every variant
    timed = [(run.baseline, run.baseline_runner)] + [
        (run.results[n], b.runner) for n, b in run.built.items() if run.results[n].status == VariantStatus.ok.value
    ]
    # Keyed by position: a variant may carry the baseline's name.
    calls = {index: runner.bind(feed) for index, (_, runner) in enumerate(timed)}
    rounds = len(round_sizes(bench.runs, bench.rounds))
    with run.reporter.task(f"timing {len(calls)} models in {rounds} interleaved round(s)",
                           steps(len(calls), bench.warmup, bench.runs, bench.rounds)) as advance:
        latencies = measure_interleaved(calls, bench.warmup, bench.runs, bench.rounds, advance,
                                        Budget(bench.timeBudgetSeconds, bench.targetPrecision))
    for index, (result, _) in enumerate(timed):
        result.latencyMs = latencies[index]
        result.speedup = run.baseline.latencyMs.mean / result.latencyMs.mean
        result.speedupRange = speedup_range(run.baseline.latencyMs, result.latencyMs)
        latency = result.latencyMs
        precision = f", mean ±{latency.precision:.1%} (95%)" if latency.precision is not None else ""
        stopped = "" if latency.stoppedBy == "runs" else f", stopped by {latency.stoppedBy}"
        run.reporter.log(f"{result.name}: {latency.mean:.2f} ± {latency.std:.2f} ms over {latency.runs} runs{precision}{stopped}")
