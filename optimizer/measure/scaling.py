"""Latency and throughput at several batch sizes and thread counts (the report's scaling table)."""

from __future__ import annotations

from optimizer.measure.benchmark import measure
from optimizer.engines.feeds import random_feed
from optimizer.engines.runners import torch_threads


def batchable(inputs) -> bool:
    return all(0 in spec.dynamicAxes for spec in inputs)


def scale(name: str, runner, inputs, batches: list[int], threads: list[int], warmup: int, runs: int,
          known: dict[tuple[int, int], float] | None = None) -> list[dict]:
    """One row per (batch, threads): mean latency and samples per second. A cell in `known` (the
    benchmark's own batch and threads → its mean) is taken from there, not timed again, so the
    table and the variants table show one number for the same thing."""
    rows = []
    known = known or {}
    for thread_count in threads:
        # ORT and OpenVINO fix their thread count when compiled; PyTorch reads it per call (torch_threads).
        timed = runner.with_threads(thread_count) if any((b, thread_count) not in known for b in batches) else None
        with torch_threads(thread_count):
            for batch in batches:
                if (batch, thread_count) in known:
                    mean, source = known[(batch, thread_count)], "benchmark"
                else:
                    shapes = {s.name: [batch, *s.shape[1:]] for s in inputs}
                    mean, source = measure(timed.bind(random_feed(inputs, shapes)), warmup, runs).mean, "scaling"
                rows.append({"variant": name, "batch": batch, "threads": thread_count, "latencyMs": mean,
                             "throughput": batch * 1000.0 / mean, "source": source})
    return rows

