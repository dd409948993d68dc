"""Latency and throughput at several batch sizes and thread counts (the report's scaling table)."""

from __future__ import annotations

from optimizer.measure.benchmark import measure
from optimizer.engines.feeds import random_feed
from optimizer.engines.runners import torch_threads


def batchable(inputs) -> bool:
    return all(0 in spec.dynamicAxes for spec in inputs)


def scale(name: str, runner, inputs, batches: list[int], threads: list[int], warmup: int, runs: int) -> list[dict]:
    """One row per (batch, threads): mean latency and samples per second."""
    rows = []
    for thread_count in threads:
        # ORT and OpenVINO fix their thread count when compiled; PyTorch reads it per call (torch_threads).
        timed = runner.with_threads(thread_count)
        with torch_threads(thread_count):
            for batch in batches:
                shapes = {s.name: [batch, *s.shape[1:]] for s in inputs}
                latency = measure(timed.bind(random_feed(inputs, shapes)), warmup, runs)
                rows.append({"variant": name, "batch": batch, "threads": thread_count,
                             "latencyMs": latency.mean, "throughput": batch * 1000.0 / latency.mean})
    return rows

