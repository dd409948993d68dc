"""The finalizer mlopt.io/summary on worker pods: a deleted pod's summary stays until it is recorded.

The worker's results reach status only through its termination message, which lives in the pod's
status. A finished pod can be deleted before the operator has read it: an eviction (a drain, a
preemption) deletes a finished pod at once, a user or a Job's TTL may delete it, and the operator
may be restarting or the API server away just then. The Job has already counted the pod (through
its own job-tracking finalizer), so it completes, and the resource would end Succeeded with nothing
in it. So every worker pod carries FINALIZER from its Job's template: deleted, it stays Terminating,
status and message intact, until the operator releases it (`release_reason` says when). An
operator that restarts sees every pod again (kopf lists them when it starts watching).

With spec.targets, a target's pod is released once that target's row in status is final (the row
keeps its summary's results), not only when the whole resource is.

Only a pod whose message may still be needed is held, so a drain waits on none but those: a deleted
attempt that the Job replaces (evicted: exit 143) or that never started is released at once.
"""

from __future__ import annotations

from typing import Any

from .job import ANNOTATION_RESOURCE_UID, FINAL_EXIT_CODES, FINALIZER, LABEL_GENERATION, LABEL_TARGET
from .status import TERMINAL, worker_state


def release_reason(pod: dict[str, Any], resource: dict[str, Any] | None) -> str | None:
    """Why the operator may remove FINALIZER from `pod` now, or None to keep it. `resource` is the pod's
    ModelOptimization with the status the operator has just recorded (None: it is deleted)."""
    meta = pod["metadata"]
    if FINALIZER not in (meta.get("finalizers") or []):
        return None
    if resource is None:
        return "its ModelOptimization is deleted"
    ran_for = (meta.get("annotations") or {}).get(ANNOTATION_RESOURCE_UID)
    if ran_for and ran_for != resource["metadata"].get("uid"):
        return "its ModelOptimization is deleted (another of the same name exists)"
    generation = (meta.get("labels") or {}).get(LABEL_GENERATION)
    if generation != str(resource["metadata"].get("generation")):
        return f"generation {generation} is superseded"
    status = resource.get("status") or {}
    if str(status.get("observedGeneration")) == generation and status.get("phase") in TERMINAL:
        return f"the outcome ({status['phase']}) is recorded"
    # A target's pod goes once its target's row is final: the row keeps what the resource needs of it.
    target = (meta.get("labels") or {}).get(LABEL_TARGET)
    row = next((r for r in status.get("targets") or [] if r.get("name") == target), None) if target else None
    if row and str(status.get("observedGeneration")) == generation and row.get("phase") in TERMINAL:
        return f"target {target}'s outcome ({row['phase']}) is recorded"
    if not meta.get("deletionTimestamp"):
        return None  # its summary may yet be needed, and nothing waits for it to go
    state = worker_state(pod)
    if terminated := state.get("terminated"):
        code = terminated.get("exitCode")
        if code == 0 or code in FINAL_EXIT_CODES:
            return None  # its summary decides the outcome: held until that is recorded
        return f"deleted, and its worker ended with exit code {code} (the Job replaces it)"
    if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
        return "deleted, and its worker never reported an end (a lost node's pod)"
    if "running" not in state:
        return "deleted before its worker started"
    return None  # deleted while running: held until the worker stops (exit 143 on SIGTERM, or it finished)
