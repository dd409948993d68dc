"""kopf handlers: resource → Job, Job/Pod → status. Thin glue around job.py and status.py.

Progress and the diff base live in annotations (prefix mlopt.io), not in status: the status schema
is fully declared for `kubectl explain`, and kopf's own fields would be pruned from it.
"""

from __future__ import annotations

import datetime
import threading
from collections import defaultdict
from typing import Any

import kopf

from optimizer.api.crd import GROUP, PLURAL, VERSION
from optimizer.api.spec_loader import SpecError

from .cluster import Cluster, JobRefused
from .job import LABEL_GENERATION, LABEL_NAME, build_job
from .settings import Settings
from .status import TERMINAL, conditions, job_finished, status_from_job

# Fields of a run's status; reset (None = removed by the merge patch) when a generation starts.
_RUN_FIELDS = (
    "reason", "message", "exitCode", "startTime", "completionTime", "best", "bestSize",
    "bestLatency", "bestSpeedup", "baseline", "variants", "results",
)
# Job and pod events for one resource arrive concurrently (kopf serializes per object, not per
# owner); one lock per resource keeps "phase changed → one Event" true.
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_state: dict[str, Any] = {}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _event(resource: dict[str, Any], phase: str, reason: str, message: str) -> None:
    kind = "Warning" if phase == "Failed" else "Normal"
    kopf.event(resource, type=kind, reason=reason or phase, message=f"{phase}: {message}"[:1000])


def _write(cluster: Cluster, resource: dict[str, Any], status: dict[str, Any], generation: int) -> None:
    """Patch status with conditions; post an Event when the phase changes."""
    old = resource.get("status") or {}
    status = {**status, "observedGeneration": generation}
    status["conditions"] = conditions(status, generation, old.get("conditions"), _now())
    if all(old.get(key) == value for key, value in status.items()):
        return
    meta = resource["metadata"]
    cluster.patch_status(meta["namespace"], meta["name"], status)
    if old.get("phase") != status.get("phase") or old.get("observedGeneration") != generation:
        _event(resource, status.get("phase", "Pending"), status.get("reason", ""), status.get("message", ""))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # No cluster-wide CRD/namespace scanning: the operator serves one known resource, so it needs
    # no RBAC on customresourcedefinitions or namespaces (the CRD must exist before it starts).
    settings.scanning.disabled = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Watches that hang up without notice would stop the operator silently; renew them.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    _state["cluster"] = Cluster()
    _state["settings"] = Settings.from_env()


# backoff=5: retry a failed Job creation in seconds, not after kopf's default 60 s.
@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", backoff=5)
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
        for job in cluster.jobs(namespace, name):
            if job["metadata"]["labels"].get(LABEL_GENERATION) != str(generation):
                cluster.delete_job(namespace, job["metadata"]["name"])
                logger.info(f"superseded Job {job['metadata']['name']} (generation {generation} replaces it)")
        if old.get("observedGeneration") == generation and old.get("phase") in TERMINAL:
            return  # this generation already ran; never run it twice
        try:
            job = build_job(current, _state["settings"])
        except SpecError as error:
            _write(cluster, current, {"phase": "Failed", "reason": "InvalidSpec", "message": str(error)}, generation)
            raise kopf.PermanentError(str(error)) from None
        if old.get("observedGeneration") != generation:
            reset = {key: None for key in _RUN_FIELDS}
            pending = {**reset, "phase": "Pending", "reason": "JobCreated", "jobName": job["metadata"]["name"],
                       "message": f"Job {job['metadata']['name']} runs generation {generation}"}
            _write(cluster, current, pending, generation)
        try:
            created = cluster.create_job(job)
        except JobRefused as refused:
            raise _job_refused(cluster, current, job["metadata"]["name"], refused, generation) from None
        if created is None:
            logger.info(f"adopted the existing Job {job['metadata']['name']}")
        else:
            logger.info(f"created Job {job['metadata']['name']}")


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


def _sync(namespace: str, name: str, generation: str) -> None:
    cluster: Cluster = _state["cluster"]
    with _locks[(namespace, name)]:
        resource = cluster.get_resource(namespace, name)
        if resource is None or str(resource["metadata"]["generation"]) != generation:
            return  # an older generation's Job, being deleted
        jobs = cluster.jobs(namespace, name, int(generation))
        if not jobs:
            return
        job = jobs[0]
        if not any(ref.get("uid") == resource["metadata"]["uid"] for ref in job["metadata"].get("ownerReferences", [])):
            return  # a Job left from a deleted resource of the same name; the GC removes it
        old = resource.get("status") or {}
        if old.get("observedGeneration") == int(generation) and old.get("phase") in TERMINAL:
            return  # final; pods vanishing later must not change the recorded outcome
        status = status_from_job(job, cluster.pods(namespace, job["metadata"]["name"]))
        _write(cluster, resource, status, int(generation))
        if status["phase"] == "Failed" and not job_finished(job):
            # Failed from the pod (e.g. ErrImageNeverPull) while the Job would wait for its deadline.
            cluster.delete_job(namespace, job["metadata"]["name"])


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_NAME: kopf.PRESENT, LABEL_GENERATION: kopf.PRESENT})
def job_changed(meta: kopf.Meta, type: str | None, **_: Any) -> None:
    if type != "DELETED":
        _sync(meta["namespace"], meta["labels"][LABEL_NAME], meta["labels"][LABEL_GENERATION])


@kopf.on.event("", "v1", "pods", labels={LABEL_NAME: kopf.PRESENT, LABEL_GENERATION: kopf.PRESENT})
def pod_changed(meta: kopf.Meta, type: str | None, **_: Any) -> None:
    if type != "DELETED":
        _sync(meta["namespace"], meta["labels"][LABEL_NAME], meta["labels"][LABEL_GENERATION])


__all__ = ["configure", "run_generation", "job_changed", "pod_changed"]
