"""/metrics: what a platform team's Prometheus scrapes from the operator."""

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mlopt_operator import metrics


def test_phases_and_queue_are_counted_at_scrape_time():
    resources = [{"status": {"phase": "Queued"}}, {"status": {"phase": "Queued"}}, {"status": {"phase": "Running"}},
                 {"status": {"phase": "Failed"}}, {}]
    registry = CollectorRegistry()
    registry.register(metrics.ResourceCollector(lambda: resources))
    text = generate_latest(registry).decode()
    assert 'mlopt_modeloptimizations{phase="Queued"} 2.0' in text
    assert 'mlopt_modeloptimizations{phase="Pending"} 1.0' in text  # no status yet: the operator has not seen it
    assert 'mlopt_modeloptimizations{phase="Succeeded"} 0.0' in text
    assert "mlopt_queue_length 2.0" in text


def test_handlers_are_timed_and_their_errors_counted():
    @metrics.observed("test_handler")
    def handler(fail):
        if fail:
            raise RuntimeError("the API server is away")
        return "ok"

    before = metrics.RECONCILE_ERRORS.labels("test_handler")._value.get()
    assert handler(False) == "ok"
    with pytest.raises(RuntimeError):
        handler(True)
    assert metrics.RECONCILE_ERRORS.labels("test_handler")._value.get() == before + 1

    @metrics.observed("test_handler")
    def queued():
        raise metrics.AskAgain("waiting for a slot", delay=10)  # normal work, retried by kopf

    with pytest.raises(metrics.AskAgain):
        queued()
    assert metrics.RECONCILE_ERRORS.labels("test_handler")._value.get() == before + 1
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'mlopt_reconcile_seconds_count{handler="test_handler"} 3.0' in text
    assert "mlopt_jobs_created_total" in text


def test_a_standby_serves_metrics_and_the_leader_adds_the_resource_counts(monkeypatch):
    import socket
    import urllib.request

    registry = CollectorRegistry()
    leader = metrics.Gauge("mlopt_leader", "", registry=registry)
    monkeypatch.setattr(metrics, "REGISTRY", registry)
    monkeypatch.setattr(metrics, "LEADER", leader)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics.serve(port)

    def scrape():
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    assert "mlopt_leader 0.0" in scrape() and "mlopt_modeloptimizations" not in scrape()
    metrics.lead(lambda: [{"status": {"phase": "Running"}}])
    text = scrape()
    assert "mlopt_leader 1.0" in text and 'mlopt_modeloptimizations{phase="Running"} 1.0' in text
