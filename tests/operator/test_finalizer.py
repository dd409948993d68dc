"""When a worker pod may let go of its summary (the mlopt.io/summary finalizer)."""

import pytest

from mlopt_operator.finalizer import release_reason

RESOURCE = {"metadata": {"name": "digits", "uid": "u-1", "generation": 2},
            "status": {"observedGeneration": 2, "phase": "Running"}}


def pod(state=None, deleting=False, generation="2", uid="u-1", phase="Running", finalizers=("mlopt.io/summary",)):
    meta = {"name": "digits-g2-abcde", "labels": {"mlopt.io/generation": generation},
            "annotations": {"mlopt.io/resource-uid": uid}, "finalizers": list(finalizers)}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:02:00Z"
    statuses = [{"name": "worker", "state": state}] if state else []
    return {"metadata": meta, "status": {"phase": phase, "containerStatuses": statuses}}


def ended(code):
    return {"terminated": {"exitCode": code, "message": "..."}}


RUNNING = {"running": {"startedAt": "2026-01-01T00:00:30Z"}}


def with_status(phase, generation=2):
    return {**RESOURCE, "status": {"observedGeneration": generation, "phase": phase}}


@pytest.mark.parametrize("case, the_pod, resource", [
    ("exited 0, deleted, outcome not recorded", pod(ended(0), deleting=True, phase="Succeeded"), RESOURCE),
    ("exited 1 (its summary says why), deleted", pod(ended(1), deleting=True, phase="Failed"), RESOURCE),
    ("deleted while running: may still exit 0", pod(RUNNING, deleting=True), RESOURCE),
    ("exited 0, not deleted", pod(ended(0), phase="Succeeded"), RESOURCE),
    ("running", pod(RUNNING), RESOURCE),
    ("an older generation's outcome is recorded, not this one's", pod(ended(0), deleting=True, phase="Succeeded"),
     with_status("Succeeded", generation=1)),
])
def test_held_while_its_summary_may_decide_the_outcome(case, the_pod, resource):
    assert release_reason(the_pod, resource) is None, case


@pytest.mark.parametrize("case, the_pod, resource, why", [
    ("the resource is deleted", pod(RUNNING, deleting=True), None, "deleted"),
    ("a namesake's pod", pod(ended(0), deleting=True, uid="u-0"), RESOURCE, "another of the same name"),
    ("a superseded generation", pod(ended(0), generation="1"), RESOURCE, "generation 1 is superseded"),
    ("the outcome is recorded", pod(ended(0), phase="Succeeded"), with_status("Succeeded"), "(Succeeded) is recorded"),
    ("Failed is recorded", pod(ended(137), deleting=True), with_status("Failed"), "(Failed) is recorded"),
    ("evicted: SIGTERM, exit 143", pod(ended(143), deleting=True, phase="Failed"), RESOURCE, "exit code 143"),
    ("deleted before it started", pod({"waiting": {"reason": "ContainerCreating"}}, deleting=True, phase="Pending"),
     RESOURCE, "before its worker started"),
    ("deleted before any container status", pod(None, deleting=True, phase="Pending"), RESOURCE, "before its worker"),
    ("a lost node's pod, failed by the garbage collector", pod(RUNNING, deleting=True, phase="Failed"), RESOURCE,
     "never reported"),
])
def test_released_when_nothing_it_holds_is_needed(case, the_pod, resource, why):
    assert why in (release_reason(the_pod, resource) or ""), case


def test_a_pod_without_the_finalizer_is_left_alone():
    assert release_reason(pod(ended(143), deleting=True, finalizers=("batch.kubernetes.io/job-tracking",)), None) is None


def target_pod(target, state, deleting=False, phase="Succeeded"):
    the_pod = pod(state, deleting=deleting, phase=phase)
    the_pod["metadata"]["labels"]["mlopt.io/target"] = target
    return the_pod


def test_a_targets_pod_goes_once_its_own_row_is_final_not_when_a_sibling_finishes():
    rows = {**RESOURCE, "status": {"observedGeneration": 2, "phase": "Running",
                                   "targets": [{"name": "amx", "phase": "Succeeded"}, {"name": "avx2", "phase": "Running"}]}}
    assert "target amx's outcome (Succeeded) is recorded" in release_reason(target_pod("amx", ended(0)), rows)
    assert release_reason(target_pod("avx2", ended(0), deleting=True), rows) is None  # its summary is not in a row yet
    older = {**rows, "status": {**rows["status"], "observedGeneration": 1}}
    assert release_reason(target_pod("amx", ended(0), deleting=True), older) is None  # an older generation's row
