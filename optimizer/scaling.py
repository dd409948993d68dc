"""Latency and throughput at several batch sizes and thread counts (the report's scaling table)."""

from __future__ import annotations

from optimizer.benchmark import measure
from optimizer.export import random_feed
from optimizer.runtime import OrtRunner, torch_threads


def batchable(inputs) -> bool:
    return all(0 in spec.dynamicAxes for spec in inputs)


def scale(name: str, runner, inputs, batches: list[int], threads: list[int], warmup: int, runs: int) -> list[dict]:
    """One row per (batch, threads): mean latency and samples per second."""
    rows = []
    for thread_count in threads:
        # ORT fixes its thread count per session; PyTorch reads it per call (set by torch_threads).
        timed = OrtRunner(runner.path, threads=thread_count, device=runner.device) if isinstance(runner, OrtRunner) else runner
        with torch_threads(thread_count):
            for batch in batches:
                shapes = {s.name: [batch, *s.shape[1:]] for s in inputs}
                latency = measure(timed.bind(random_feed(inputs, shapes)), warmup, runs)
                rows.append({"variant": name, "batch": batch, "threads": thread_count,
                             "latencyMs": latency.mean, "throughput": batch * 1000.0 / latency.mean})
    return rows

