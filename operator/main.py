"""`mlopt operator`: run the kopf operator that turns ModelOptimizations into Jobs and status.

Never imports torch or onnxruntime: the operator image carries only kopf, the kubernetes client
and mlopt's torch-free spec/summary models.

operator/ has no __init__.py on purpose: with the repo root on sys.path (`python -m ...` run
there), a regular package named `operator` would shadow the standard library's `operator` and
break the interpreter. Installed, the folder is the namespace package `mlopt_operator`; the
entry point is `mlopt_operator.main.main(argv)`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlopt operator", description="Run the ModelOptimization operator.")
    parser.add_argument(
        "--namespace", "-n", action="append", default=[],
        help="serve only this namespace (repeatable); default: all namespaces",
    )
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz",
        help="kopf's liveness endpoint (empty to disable)",
    )
    parser.add_argument(
        "--leader-election", action="store_true",
        help="run as one of several replicas: only the holder of the Lease mlopt-operator (in POD_NAMESPACE) acts",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


def _standby_health(liveness: str):
    """Answer the liveness URL while waiting for the lease (kopf serves it once this replica leads)."""
    import http.server
    import threading
    import urllib.parse

    url = urllib.parse.urlparse(liveness)

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(200 if self.path == url.path else 404)
            self.end_headers()
            self.wfile.write(b"standby\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((url.hostname, url.port or 80), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _lead(liveness: str, namespace: str):
    """Block until this replica holds the lease; exit the process if it is ever lost. Returns the lease."""
    import functools
    import os

    from .cluster import Cluster
    from .leader import REQUEST_TIMEOUT, Lease, acquire, identity, keep

    lease = Lease(functools.partial(Cluster().request, timeout=REQUEST_TIMEOUT), namespace, "mlopt-operator",
                  identity())
    health = _standby_health(liveness) if liveness else None
    acquire(lease)
    if health:
        health.shutdown()
        health.server_close()
    # Exit rather than stop: the container restarts as a standby with nothing half-done in memory.
    keep(lease, on_lost=lambda: os._exit(1))
    return lease


def main(argv: list[str] | None = None) -> int:
    """Run until stopped (SIGINT/SIGTERM); returns the exit code."""
    args = _parser().parse_args(argv)
    import kopf

    from . import handlers  # registers the handlers

    handlers._state["namespaces"] = args.namespace or None  # the queue counts what this operator serves

    from . import metrics
    from .settings import Settings

    settings = Settings.from_env()
    metrics.serve(settings.metrics_port)  # before the election: a standby answers scrapes too
    kopf.configure(verbose=args.verbose, log_prefix=True)
    logging.getLogger("kopf.objects").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    lease = _lead(args.liveness, settings.namespace) if args.leader_election else None
    # standalone: no kopf peering (a Lease elects the replica that acts, operator/leader.py).
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness or None,
        )
    )
    if lease:  # stopped cleanly (SIGTERM, e.g. a rollout): hand over now
        lease.release()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
