"""/metrics in the Prometheus text format: resources by phase, the queue, Jobs created, reconcile
errors and latency, and which replica leads. Served by prometheus_client's own HTTP server on
MLOPT_METRICS_PORT from the start, by every replica (a standby is a healthy scrape target too).

Phases and the queue are counted when Prometheus scrapes (one list of the served resources), so
they are right after a restart or a failover, with no state to rebuild; only the leader reports
them, so summing over the Service's replicas never counts a resource twice.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import kopf
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

PHASES = ("Queued", "Pending", "Running", "Succeeded", "Failed")

REGISTRY = CollectorRegistry()
JOBS_CREATED = Counter("mlopt_jobs_created", "Jobs the operator created", registry=REGISTRY)
RECONCILE_ERRORS = Counter("mlopt_reconcile_errors", "Handler runs that raised (retried or permanent)",
                           ["handler"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram("mlopt_reconcile_seconds", "Time a handler run took", ["handler"], registry=REGISTRY,
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
LEADER = Gauge("mlopt_leader", "1 on the replica that acts (holds the Lease), 0 on a standby", registry=REGISTRY)


class AskAgain(kopf.TemporaryError):
    """Call this handler again after `delay` as part of normal work (a Queued resource waiting for a
    slot): kopf retries it like any TemporaryError, but it is not a reconcile error, so an alert on
    mlopt_reconcile_errors_total stays quiet while the queue drains."""


class ResourceCollector:
    """ModelOptimizations by phase and the queue's length, from one list of the served resources."""

    def __init__(self, list_resources: Callable[[], list[dict[str, Any]]]):
        self.list_resources = list_resources

    def collect(self):
        by_phase = GaugeMetricFamily("mlopt_modeloptimizations", "ModelOptimizations by status.phase", labels=["phase"])
        queue = GaugeMetricFamily("mlopt_queue_length", "ModelOptimizations waiting for a slot (phase Queued)")
        try:
            resources = self.list_resources()
        except Exception:  # the API server is away: report no sample rather than a wrong one
            return
        phases = [((r.get("status") or {}).get("phase") or "Pending") for r in resources]
        for phase in PHASES:
            by_phase.add_metric([phase], phases.count(phase))
        queue.add_metric([], phases.count("Queued"))
        yield by_phase
        yield queue


def observed(handler: str):
    """Time every run of a handler and count the ones that raise (kopf retries them)."""

    def wrap(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            except AskAgain:
                raise
            except Exception:
                RECONCILE_ERRORS.labels(handler).inc()
                raise
            finally:
                RECONCILE_SECONDS.labels(handler).observe(time.perf_counter() - start)

        return run

    return wrap


def serve(port: int) -> None:
    """Start the /metrics server (a daemon thread); port 0 turns it off."""
    if port:
        start_http_server(port, registry=REGISTRY)


def lead(list_resources: Callable[[], list[dict[str, Any]]]) -> None:
    """This replica acts from now on: report the resources by phase and the queue, and leader 1."""
    REGISTRY.register(ResourceCollector(list_resources))
    LEADER.set(1)
