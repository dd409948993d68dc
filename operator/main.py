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
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run until stopped (SIGINT/SIGTERM); returns the exit code."""
    args = _parser().parse_args(argv)
    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose, log_prefix=True)
    logging.getLogger("kopf.objects").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # standalone: one operator replica, no peering CRDs to install or grant.
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness or None,
        )
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
