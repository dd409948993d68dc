"""kopf handlers: resource → Job, Job/Pod → status. Thin glue around job.py and status.py.

Progress and the diff base live in annotations (prefix mlopt.io), not in status: the status schema
is fully declared for `kubectl explain`, and kopf's own fields would be pruned from it.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import defaultdict
from typing import Any

import kopf

from optimizer.api.crd import GROUP, KIND, PLURAL, VERSION
from optimizer.api.spec import ModelOptimization
from optimizer.api.spec_loader import SpecError, parse_spec

from .cluster import Cluster, JobRefused
from . import leader, metrics
from .finalizer import release_reason
from .job import (ANNOTATION_RESOURCE, LABEL_GENERATION, LABEL_NAME, LABEL_QUEUE, LABEL_TARGET, MANAGED_BY,
                  build_jobs)
from .policy import CONFIGMAP, PolicySource, PolicyUnreadable, violations
from .queue import admit, unstarted_targets
from .settings import Settings
from .status import (RESULT_KEYS, TERMINAL, conditions, job_finished, queued_row, status_from_job,
                     status_from_targets, target_row)

# Fields of a run's status; reset (None = removed by the merge patch) when a generation starts.
_RUN_FIELDS = (
    "reason", "message", "exitCode", "startTime", "completionTime", "best", "bestSize",
    "bestLatency", "bestSpeedup", "baseline", "variants", "results", "output", "artifacts", "queuePosition",
    "jobName", "targets", "recommendation", "recommended",
)
QUEUE_RETRY_SECONDS = 10  # how soon a Queued resource asks again for a slot
POLICY_RETRY_SECONDS = 30  # how soon a resource held by an unreadable policy ConfigMap is tried again
CRD_WAIT_SECONDS = 120  # at startup, for the CRD to be Established (applied together with the operator)
# Job and pod events for one resource arrive concurrently (kopf serializes per object, not per
# owner); one lock per resource keeps "phase changed → one Event" true.
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_state: dict[str, Any] = {}
LOG = logging.getLogger("mlopt.operator")
# Admission reads the queue and the running Jobs, then creates a Job: one at a time, or two
# resources could take the same free slot.
_admission = threading.Lock()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _event(resource: dict[str, Any], phase: str, reason: str, message: str) -> None:
    kind = "Warning" if phase == "Failed" else "Normal"
    kopf.event(resource, type=kind, reason=reason or phase, message=f"{phase}: {message}"[:1000])


def _write(cluster: Cluster, resource: dict[str, Any], status: dict[str, Any], generation: int) -> dict[str, Any]:
    """Patch status with conditions; post an Event when the phase changes. Returns the status as recorded."""
    old = resource.get("status") or {}
    status = {**status, "observedGeneration": generation}
    status["conditions"] = conditions(status, generation, old.get("conditions"), _now())
    recorded = {key: value for key, value in {**old, **status}.items() if value is not None}
    if all(old.get(key) == value for key, value in status.items()):
        return recorded
    meta = resource["metadata"]
    cluster.patch_status(meta["namespace"], meta["name"], status)
    changed = any(old.get(key) != status.get(key) for key in ("phase", "reason", "observedGeneration"))
    if changed and status.get("reason") is not None:  # None: a field being reset, not a new state
        _event(resource, status.get("phase", "Pending"), status.get("reason", ""), status.get("message", ""))
    return recorded


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: Any, **_: Any) -> None:
    # No cluster-wide CRD/namespace scanning: the operator serves one known resource, so it needs
    # no RBAC on namespaces and reads only its own CRD (waiting for it to be Established, below).
    settings.scanning.disabled = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Only the operator's own Jobs and pods, filtered by the API server (the handlers' label filters
    # are client-side): a cluster's other pods never reach the operator's memory.
    settings.watching.label_selectors["batch", "v1", "jobs"] = MANAGED_BY
    settings.watching.label_selectors["", "v1", "pods"] = MANAGED_BY
    # Watches that hang up without notice would stop the operator silently; renew them.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    cluster = _state["cluster"] = Cluster()
    operator_settings = _state["settings"] = Settings.from_env()
    _state["policy"] = PolicySource(lambda: cluster.configmap(operator_settings.namespace, CONFIGMAP))
    _state.setdefault("namespaces", None)  # main() sets the served namespaces (None: all)
    _wait_for_crd(cluster, logger)
    if not _state.get("metrics_leading"):
        metrics.lead(lambda: cluster.resources(_state.get("namespaces")))
        _state["metrics_leading"] = True


def _wait_for_crd(cluster: Cluster, logger: Any) -> None:
    """Watching a resource the API server does not serve yet fails; `kubectl apply -k` creates the CRD
    and the operator together, so wait for it to be Established instead of crash-looping."""
    deadline = time.monotonic() + CRD_WAIT_SECONDS
    while not cluster.crd_established():
        if time.monotonic() > deadline:
            raise kopf.PermanentError(f"the ModelOptimization CRD is not Established after {CRD_WAIT_SECONDS} s: "
                                      "apply crds/ (or manifests/) first")
        logger.info("waiting for the ModelOptimization CRD to be Established")
        time.sleep(2)


# backoff=5: retry a failed Job creation in seconds, not after kopf's default 60 s.
@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", backoff=5)
@metrics.observed("run_generation")
def run_generation(body: kopf.Body, logger: Any, **_: Any) -> None:
    """One Job per generation: adopt it if it exists, else create it; stop older generations."""
    cluster: Cluster = _state["cluster"]
    resource = dict(body)
    meta = resource["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], int(meta["generation"])
    with _locks[(namespace, name)]:
        current = cluster.get_resource(namespace, name)
        if current is None or int(current["metadata"]["generation"]) != generation:
            return  # deleted, or a newer generation's update is queued behind this one
        old = current.get("status") or {}
        ours = []  # this generation's Jobs that exist already (one listing serves both questions)
        for job in cluster.jobs(namespace, name):
            if job["metadata"]["labels"].get(LABEL_GENERATION) == str(generation):
                ours.append(job)
            else:
                cluster.delete_job(namespace, job["metadata"]["name"])
                logger.info(f"superseded Job {job['metadata']['name']} (generation {generation} replaces it)")
        if old.get("observedGeneration") == generation and old.get("phase") in TERMINAL:
            return  # this generation already ran; never run it twice
        try:
            spec = parse_spec(current, f"{KIND} {name}")
            jobs = build_jobs(current, _state["settings"], spec)
        except SpecError as error:
            _write(cluster, current, {**_fresh(current, generation), "phase": "Failed", "reason": "InvalidSpec",
                                      "message": str(error)}, generation)
            raise kopf.PermanentError(str(error)) from None
        if not spec.spec.targets:
            if ours:
                logger.info(f"adopted the existing Job {jobs[0]['metadata']['name']}")
                return
            _check_policy(cluster, current, spec, generation)
            with _admission:
                _start(cluster, current, jobs[0], generation, logger)
            return
        unstarted = unstarted_targets(current, ours)
        missing = [job for job in jobs if job["metadata"]["labels"][LABEL_TARGET] in unstarted]
        if not missing:
            logger.info(f"adopted the existing Jobs {', '.join(j['metadata']['name'] for j in ours)}")
            return
        if not ours:  # checked once per generation: the spec of a generation never changes
            _check_policy(cluster, current, spec, generation)
        with _admission:
            _start_targets(cluster, current, missing, started=bool(ours), generation=generation, logger=logger)


def _fresh(resource: dict[str, Any], generation: int) -> dict[str, None]:
    """The run fields to clear when a new generation starts (an older run's results must not linger)."""
    old = resource.get("status") or {}
    return {key: None for key in _RUN_FIELDS} if old.get("observedGeneration") != generation else {}


def _check_policy(cluster: Cluster, resource: dict[str, Any], spec: ModelOptimization, generation: int) -> None:
    """Failed, naming each rule, when the spec asks for more than the cluster's policy allows; held
    Pending while the policy ConfigMap is unreadable (fail closed: no Job without a policy)."""
    settings: Settings = _state["settings"]
    where = f"ConfigMap {settings.namespace}/{CONFIGMAP}"
    try:
        policy = _state["policy"].current()
    except PolicyUnreadable as error:
        message = f"no Job is created while the policy is unreadable: {error}"
        _write(cluster, resource, {"phase": "Pending", "reason": "PolicyUnreadable", "message": message}, generation)
        raise kopf.TemporaryError(message, delay=POLICY_RETRY_SECONDS) from None
    broken = violations(spec, policy, settings)
    if broken:
        message = f"refused by the cluster's mlopt policy ({where}): " + "; ".join(broken)
        _write(cluster, resource, {**_fresh(resource, generation), "phase": "Failed", "reason": "PolicyViolation",
                                   "message": message}, generation)
        raise kopf.PermanentError(message)


# A Job is created only while no standby can take the lease for at least this long: the status write and
# the create that follow the admission must land while this replica is still the only one counting Jobs.
FENCE_SECONDS = 2 * leader.REQUEST_TIMEOUT + 1


def _still_leading(what: str) -> float:
    """The request timeout for `what` (seconds this replica may still act alone, less a second); asks
    again shortly when the lease was not renewed recently enough (the API server was away)."""
    left = leader.time_to_act()
    if left is None:
        return 30.0
    if left < FENCE_SECONDS:
        raise metrics.AskAgain(f"not {what}: the lease was last renewed {leader.DURATION - left:.0f} s ago, "
                               "so a standby may soon take over", delay=leader.RETRY)
    return left - 1


def _slots(cluster: Cluster, resource: dict[str, Any], generation: int, wanted: int, whole: bool) -> int:
    """How many of the resource's `wanted` Jobs the queue lets start now (all of them under Kueue). When
    none may: Queued with the position (`whole`: nothing of this generation runs yet; else its targets'
    rows say which wait) and asked again soon."""
    if (resource["spec"].get("job") or {}).get("queueName"):
        return wanted
    settings: Settings = _state["settings"]
    namespaces = _state.get("namespaces")
    place = admit(resource, cluster.resources(namespaces), cluster.worker_jobs(namespaces), settings, cluster.priority)
    if place.admitted:
        return min(place.slots, wanted)
    cap = f"cap {settings.max_running}" + (f", {settings.max_running_per_namespace} per namespace"
                                             if settings.max_running_per_namespace else "")
    message = (f"waiting for a slot: {place.running} optimization(s) running ({cap}); "
               f"position {place.position} of {place.waiting}")
    if whole:
        _write(cluster, resource, {**_fresh(resource, generation), "phase": "Queued", "reason": "OverCap",
                                   "message": message, "queuePosition": place.position}, generation)
    raise metrics.AskAgain(message, delay=QUEUE_RETRY_SECONDS)


def _create(cluster: Cluster, resource: dict[str, Any], job: dict[str, Any], generation: int, logger: Any) -> None:
    try:
        created = cluster.create_job(job, timeout=_still_leading("creating a Job"))
    except JobRefused as refused:
        raise _job_refused(cluster, resource, job["metadata"]["name"], refused, generation) from None
    if created is not None:
        metrics.JOBS_CREATED.inc()
    logger.info(f"{'created' if created is not None else 'adopted the existing'} Job {job['metadata']['name']}")


def _start(cluster: Cluster, resource: dict[str, Any], job: dict[str, Any], generation: int, logger: Any) -> None:
    """Create the generation's Job if the queue admits it; else Queued with the position, asked again soon."""
    fresh = _fresh(resource, generation)
    _slots(cluster, resource, generation, 1, whole=True)
    _still_leading("creating a Job")  # what admit() counted holds only while no other replica admits
    pending = {**fresh, "phase": "Pending", "reason": "JobCreated", "jobName": job["metadata"]["name"],
               "queuePosition": None, "message": f"Job {job['metadata']['name']} runs generation {generation}"}
    _write(cluster, resource, pending, generation)
    _create(cluster, resource, job, generation, logger)


def _start_targets(cluster: Cluster, resource: dict[str, Any], missing: list[dict[str, Any]], started: bool,
                   generation: int, logger: Any) -> None:
    """Create the Jobs of the targets not started yet, as many as the queue admits (one slot each, in the
    spec's order); asked again soon while some still wait. `started`: some target's Job exists already."""
    fresh = _fresh(resource, generation)
    count = _slots(cluster, resource, generation, len(missing), whole=not started)
    _still_leading("creating a Job")
    names = [job["metadata"]["name"] for job in missing[:count]]
    if fresh or not started:
        _write(cluster, resource, {**fresh, "phase": "Pending", "reason": "JobCreated", "queuePosition": None,
                                   "message": f"Jobs {', '.join(names)} run generation {generation}"}, generation)
    for job in missing[:count]:
        _create(cluster, resource, job, generation, logger)
    current = cluster.get_resource(resource["metadata"]["namespace"], resource["metadata"]["name"])
    if current is not None:
        _record(cluster, current, str(generation))  # the rows: which targets run, which still wait
    if count < len(missing):
        raise metrics.AskAgain(f"{len(missing) - count} target(s) wait for a slot", delay=QUEUE_RETRY_SECONDS)


def _job_refused(cluster: Cluster, resource: dict[str, Any], job_name: str, refused: JobRefused,
                 generation: int) -> Exception:
    """The API server refused the Job: Failed when resending cannot help, else Pending with the reason
    (e.g. a ResourceQuota) and a slow retry. Either way the status says what the API server said;
    returns the error that tells kopf which of the two it is."""
    if refused.permanent:
        message = f"the API server refused Job {job_name}: {refused.message}"
        _write(cluster, resource, {"phase": "Failed", "reason": "JobRejected", "message": message}, generation)
        return kopf.PermanentError(message)
    message = f"the API server forbids Job {job_name} for now (retrying every minute): {refused.message}"
    _write(cluster, resource, {"phase": "Pending", "reason": "JobForbidden", "message": message}, generation)
    return kopf.TemporaryError(message, delay=60)


def _sync(namespace: str, name: str, generation: str, pod: dict[str, Any] | None = None) -> None:
    """Record the generation's status from its Job and pods, then release the pods (and `pod`, the one
    whose event this is) that no longer need to keep their summary."""
    cluster: Cluster = _state["cluster"]
    with _locks[(namespace, name)]:
        resource = cluster.get_resource(namespace, name)
        pods = _record(cluster, resource, generation) if resource is not None else []
        if pod is not None and pod["metadata"]["name"] not in {p["metadata"]["name"] for p in pods}:
            pods.append(pod)
        for each in pods:
            if why := release_reason(each, resource):
                cluster.release_pod(namespace, each["metadata"]["name"])
                LOG.info(f"released pod {namespace}/{each['metadata']['name']}: {why}")


def _record(cluster: Cluster, resource: dict[str, Any], generation: str) -> list[dict[str, Any]]:
    """Write `generation`'s status into `resource` (and the cluster); returns the pods it read."""
    namespace, name = resource["metadata"]["namespace"], resource["metadata"]["name"]
    if str(resource["metadata"]["generation"]) != generation:
        return []  # an older generation's Job, being deleted
    jobs = cluster.jobs(namespace, name, int(generation))
    # A Job left from a deleted resource of the same name is not this one's; the GC removes it.
    jobs = [job for job in jobs if any(ref.get("uid") == resource["metadata"]["uid"]
                                       for ref in job["metadata"].get("ownerReferences", []))]
    if not jobs:
        return []
    old = resource.get("status") or {}
    if old.get("observedGeneration") == int(generation) and old.get("phase") in TERMINAL:
        return []  # final; pods vanishing later must not change the recorded outcome
    if LABEL_TARGET in jobs[0]["metadata"]["labels"]:
        return _record_targets(cluster, resource, generation, jobs)
    job = jobs[0]
    pods, status = _job_status(cluster, job)
    resource["status"] = _write(cluster, resource, status, int(generation))
    if status["phase"] == "Failed" and not job_finished(job):
        # Failed from the pod (e.g. ErrImageNeverPull) while the Job would wait for its deadline.
        cluster.delete_job(namespace, job["metadata"]["name"])
    return pods


def _job_status(cluster: Cluster, job: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The Job's pods and its status_from_job."""
    namespace = job["metadata"]["namespace"]
    pods = cluster.pods(namespace, job["metadata"]["name"])
    events = [] if pods else cluster.job_events(namespace, job["metadata"]["name"])  # FailedCreate
    if not pods and job["spec"].get("suspend") and LABEL_QUEUE in (job["metadata"].get("labels") or {}):
        events += cluster.workload_events(job)  # why Kueue has not admitted it (e.g. insufficient quota)
    return pods, status_from_job(job, pods, events, waits=_state["settings"].waits)


def _record_targets(cluster: Cluster, resource: dict[str, Any], generation: str,
                    jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target from its Job (a final row is kept as recorded: its pod may be gone), the
    resource's status from the rows; a target failed from its pod (unschedulable past the wait, an image
    that never comes) has its Job deleted, so it holds no slot and the others go on."""
    namespace = resource["metadata"]["namespace"]
    try:
        spec = parse_spec(resource, f"{KIND} {resource['metadata']['name']}")
    except SpecError:
        return []  # not this generation's spec (its Jobs were made from a valid one)
    old = resource.get("status") or {}
    recorded = {row.get("name"): row for row in old.get("targets") or []} \
        if old.get("observedGeneration") == int(generation) else {}
    by_target = {job["metadata"]["labels"].get(LABEL_TARGET): job for job in jobs}
    rows, read, stop = [], [], []
    for target in spec.spec.targets or []:
        before, job = recorded.get(target.name), by_target.get(target.name)
        if before and before.get("phase") in TERMINAL:
            rows.append(before)
        elif job is None:
            rows.append(queued_row(target))
        else:
            pods, status = _job_status(cluster, job)
            rows.append(target_row(target, status, pods))
            read += pods
            if status["phase"] == "Failed" and not job_finished(job):
                stop.append(job["metadata"]["name"])
    status = status_from_targets(spec, rows)
    # A field of an earlier recommendation that the current one lacks is removed, not left behind.
    stale = {key: None for key in (*RESULT_KEYS, "recommendation", "recommended") if key in old and key not in status}
    resource["status"] = _write(cluster, resource, {**stale, **status}, int(generation))
    for name in stop:
        cluster.delete_job(namespace, name)
    return read


def _resource_name(meta: kopf.Meta) -> str:
    """The owning resource's name: the annotation holds it whole (the label may be a hashed short form)."""
    return (meta.get("annotations") or {}).get(ANNOTATION_RESOURCE) or meta["labels"][LABEL_NAME]


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_NAME: kopf.PRESENT, LABEL_GENERATION: kopf.PRESENT})
@metrics.observed("job_changed")
def job_changed(meta: kopf.Meta, type: str | None, **_: Any) -> None:
    if type != "DELETED":
        _sync(meta["namespace"], _resource_name(meta), meta["labels"][LABEL_GENERATION])


# Also called for every existing pod when the operator starts (type None): leftovers are released.
@kopf.on.event("", "v1", "pods", labels={LABEL_NAME: kopf.PRESENT, LABEL_GENERATION: kopf.PRESENT})
@metrics.observed("pod_changed")
def pod_changed(body: kopf.Body, meta: kopf.Meta, type: str | None, **_: Any) -> None:
    if type != "DELETED":
        _sync(meta["namespace"], _resource_name(meta), meta["labels"][LABEL_GENERATION], pod=dict(body))


def _waiting_on_kubernetes(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") in ("Pending", "Queued") and status.get("reason") != "OverCap"


# A Job that cannot make its pod, or a pod that cannot start, may produce no further Job or pod
# event: look again every few seconds, so FailedCreate is seen and the waits in Settings end it.
@kopf.timer(GROUP, VERSION, PLURAL, interval=10, initial_delay=5, when=_waiting_on_kubernetes)
@metrics.observed("recheck_waiting")
def recheck_waiting(meta: kopf.Meta, **_: Any) -> None:
    _sync(meta["namespace"], meta["name"], str(meta["generation"]))


def _running(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") == "Running"


# kopf never delivers a watch event again whose handler raised: a Job's completion handled while the
# API server restarts (the status write refused) would leave the resource Running with its results
# unread, as a finished Job makes no further event. Look at a Running resource again now and then.
@kopf.timer(GROUP, VERSION, PLURAL, interval=30, initial_delay=30, when=_running)
@metrics.observed("recheck_running")
def recheck_running(meta: kopf.Meta, **_: Any) -> None:
    _sync(meta["namespace"], meta["name"], str(meta["generation"]))


__all__ = ["configure", "run_generation", "job_changed", "pod_changed", "recheck_waiting", "recheck_running"]
