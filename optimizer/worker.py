"""The Kubernetes Job entrypoint: run the spec snapshot, write full results and a compact summary.

The operator passes the resource (as it was at one generation) in MLOPT_SPEC. The summary goes to
the termination message file, which Kubernetes copies into the pod status for the operator.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

from optimizer.console import LogReporter
from optimizer.spec_loader import SpecError, parse_spec
from optimizer.summary import failure_summary, success_summary

DEFAULT_OUTPUT = "/scratch/results"
TERMINATION_LOG = "/dev/termination-log"


def _write_summary(text: str) -> None:
    path = Path(os.environ.get("MLOPT_TERMINATION_LOG", TERMINATION_LOG))
    try:
        path.write_text(text)
    except OSError as error:  # outside Kubernetes there may be no such file: the log still has it
        print(f"[mlopt] cannot write the summary to {path}: {error}")
    print(f"[mlopt] summary: {text}", flush=True)


def main() -> int:
    reporter = LogReporter()
    try:
        spec = parse_spec(json.loads(os.environ["MLOPT_SPEC"]), "MLOPT_SPEC")
    except KeyError:
        _write_summary(failure_summary("InvalidSpec", "MLOPT_SPEC is not set; the operator passes the spec there"))
        return 2
    except (SpecError, ValueError) as error:
        _write_summary(failure_summary("InvalidSpec", str(error)))
        return 2
    from optimizer.errors import OptimizationError, internal_error
    from optimizer.pipeline import optimize

    output = Path(os.environ.get("MLOPT_OUTPUT", DEFAULT_OUTPUT))
    try:
        results = optimize(spec, output, Path.cwd(), reporter)
    except OptimizationError as error:
        _write_summary(failure_summary(error.reason, str(error)))
        return error.exit_code
    except Exception as error:  # an mlopt bug: the traceback goes to the pod log, one line to status
        traceback.print_exc()
        _write_summary(failure_summary("InternalError", internal_error(error)))
        return 1
    _write_summary(success_summary(results, str(output / "results.json")))
    return 0
