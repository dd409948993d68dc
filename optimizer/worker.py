"""The Kubernetes Job entrypoint: run the spec snapshot, write full results and a compact summary.

The operator passes the resource (as it was at one generation) in MLOPT_SPEC. The summary goes to
the termination message file, which Kubernetes copies into the pod status for the operator.
"""

from __future__ import annotations

import json
import os
import signal
import traceback
from pathlib import Path

from optimizer.console import LogReporter
from optimizer.api.spec_loader import SpecError, parse_spec
from optimizer.api.summary import failure_summary, success_summary

DEFAULT_OUTPUT = "/scratch/results"
TERMINATION_LOG = "/dev/termination-log"


def _write_summary(text: str) -> None:
    path = Path(os.environ.get("MLOPT_TERMINATION_LOG", TERMINATION_LOG))
    try:
        path.write_text(text)
    except OSError as error:  # outside Kubernetes there may be no such file: the log still has it
        print(f"[mlopt] cannot write the summary to {path}: {error}")
    print(f"[mlopt] summary: {text}", flush=True)


def _stop(signum: int, frame: object) -> None:
    # The worker is PID 1 of its container, and the kernel ignores a signal PID 1 has no handler for:
    # without this, an evicted, preempted or deleted pod would run on through its grace period (and
    # might finish, in a pod that is then deleted with its summary). Unwinding runs the cleanups, so
    # nothing half-written is left; 143 (128 + SIGTERM) is not a final exit code, so the Job decides.
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    reporter = LogReporter()
    try:
        spec = parse_spec(json.loads(os.environ["MLOPT_SPEC"]), "MLOPT_SPEC")
    except KeyError:
        _write_summary(failure_summary("InvalidSpec", "MLOPT_SPEC is not set; the operator passes the spec there"))
        return 2
    except (SpecError, ValueError) as error:
        _write_summary(failure_summary("InvalidSpec", str(error)))
        return 2
    target = os.environ.get("MLOPT_TARGET") or None  # the operator's Job for one of spec.targets
    if target is not None:
        try:
            spec.target(target)
        except KeyError as error:
            _write_summary(failure_summary("InvalidSpec", f"MLOPT_TARGET: {error.args[0]}"))
            return 2
    from optimizer.pipeline import optimize_to
    from optimizer.api import uris
    from optimizer.api.errors import OptimizationError, internal_error

    # spec.output when the user set one (s3:// or pvc://: a path would die with the pod); else the
    # scratch folder, and the status says that nothing was kept.
    kept = "output" in spec.spec.model_fields_set and spec.spec.output.startswith(("s3://", "pvc://"))
    if "output" in spec.spec.model_fields_set and not kept:
        reporter.log(f"spec.output {spec.spec.output!r} is a path inside the pod, which is deleted with it; "
                     "use s3://bucket/prefix/ or pvc://claim/path/ to keep the results")
    output = spec.spec.output if kept else os.environ.get("MLOPT_OUTPUT", DEFAULT_OUTPUT)
    try:
        results, location = optimize_to(spec, output, Path.cwd(), reporter, target=target)
    except OptimizationError as error:
        _write_summary(failure_summary(error.reason, str(error)))
        return error.exit_code
    except Exception as error:  # an mlopt bug: the traceback goes to the pod log, one line to status
        traceback.print_exc()
        _write_summary(failure_summary("InternalError", internal_error(error)))
        return 1
    stored = uris.target_output(output, target) if target else output
    _write_summary(success_summary(results, location, stored if kept else None))
    return 0
