"""`mlopt operator` as a user starts it, without a cluster: what it does before it can act.

The e2e suite runs the same command against the real control plane; here no API server answers
(the kubeconfig points at a closed port), which is what a replica meets while the API server is
away. It must serve /metrics from the start, and with --leader-election stay a standby that says
so: it never acts without the Lease.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MLOPT = str(Path(sys.executable).with_name("mlopt"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return None


def _until(check, seconds: float, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"mlopt operator exited ({process.returncode}):\n{log.read_text()[-3000:]}"
        if value := check():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {seconds} s:\n{log.read_text()[-3000:]}")


def test_mlopt_operator_without_an_api_server_serves_metrics_and_stays_a_standby(tmp_path):
    away = _free_port()  # nothing listens here: the API server is away
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "away",
        "clusters": [{"name": "away", "cluster": {"server": f"https://127.0.0.1:{away}",
                                                  "insecure-skip-tls-verify": True}}],
        "users": [{"name": "op", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "away", "context": {"cluster": "away", "user": "op"}}]}))
    metrics_port, health_port = _free_port(), _free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "MLOPT_METRICS_PORT": str(metrics_port),
           "POD_NAMESPACE": "mlopt-system", "POD_NAME": "mlopt-operator-test"}
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        process = subprocess.Popen([MLOPT, "operator", "--leader-election",
                                    f"--liveness=http://127.0.0.1:{health_port}/healthz"],
                                   cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        status, metrics = _until(lambda: _get(f"http://127.0.0.1:{metrics_port}/metrics"), 60, process, log)
        assert status == 200
        for family in ("mlopt_jobs_created_total", "mlopt_reconcile_errors", "mlopt_leader"):
            assert family in metrics, metrics
        # The standby answers its liveness URL (so a Deployment keeps it) and says what it is...
        assert _until(lambda: _get(f"http://127.0.0.1:{health_port}/healthz"), 30, process, log) == (200, "standby\n")
        assert _get(f"http://127.0.0.1:{health_port}/other")[0] == 404
        time.sleep(4)  # a few Lease attempts (3 s timeout each) later it still does not lead
        assert process.poll() is None, log.read_text()[-3000:]
        _, metrics = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert "mlopt_leader 0.0" in metrics, metrics
        assert _get(f"http://127.0.0.1:{health_port}/healthz") == (200, "standby\n")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
