"""The operator's queue: which waiting ModelOptimizations may start a Job now, as a pure function.

Benchmark pods that share nodes disturb each other's timings, so at most `max_running` run in the
cluster and `max_running_per_namespace` in one namespace (0 = no cap). The rest wait in phase
Queued, FIFO by creation within a priority (the PriorityClass value of spec.job.priorityClassName,
higher first). Resources with spec.job.queueName are left to Kueue and neither wait here nor count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from .job import LABEL_QUEUE
from .settings import Settings
from .status import TERMINAL, job_ended

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    position: int  # among the resources still waiting after this round, 1 = next; 0 when admitted
    waiting: int  # how many wait in all
    running: int  # Jobs running now, cluster-wide


def _key(resource: dict[str, Any]) -> Key:
    return resource["metadata"]["namespace"], resource["metadata"]["name"]


def _kueue(resource: dict[str, Any]) -> bool:
    return bool(((resource.get("spec") or {}).get("job") or {}).get("queueName"))


def job_running(job: dict[str, Any]) -> bool:
    """A Job that holds a slot: until Kubernetes ends it (Complete / Failed), and not one Kueue admits.
    Not freed at the interim SuccessCriteriaMet / FailureTarget: after FailureTarget its pods are still
    being stopped, and by the Jobs' own start and completion times the cap would not hold."""
    return LABEL_QUEUE not in job["metadata"].get("labels", {}) and not job_ended(job)


def waiting(resource: dict[str, Any]) -> bool:
    """Needs a Job for its current generation and has not been given one yet."""
    if _kueue(resource):
        return False
    status = resource.get("status") or {}
    generation = int(resource["metadata"].get("generation") or 0)
    if status.get("observedGeneration") != generation:
        return True  # a new generation the operator has not started
    return status.get("phase") == "Queued" or (status.get("phase") not in TERMINAL and not status.get("jobName"))


def admit(resource: dict[str, Any], resources: list[dict[str, Any]], jobs: list[dict[str, Any]],
          settings: Settings, priority: Callable[[str | None], int]) -> Admission:
    """Whether `resource` may start its Job now, given every served resource and every worker Job."""
    running = [job for job in jobs if job_running(job)]
    by_namespace = Counter(job["metadata"]["namespace"] for job in running)
    queue = [r for r in resources if waiting(r)]
    if _key(resource) not in {_key(r) for r in queue}:
        queue.append(resource)

    def order(r: dict[str, Any]):
        job = (r.get("spec") or {}).get("job") or {}
        return (-priority(job.get("priorityClassName")), r["metadata"].get("creationTimestamp") or "", *_key(r))

    free = settings.max_running - len(running) if settings.max_running > 0 else len(queue)
    left_behind: list[Key] = []
    admitted: set[Key] = set()
    for candidate in sorted(queue, key=order):
        namespace = candidate["metadata"]["namespace"]
        namespace_full = (settings.max_running_per_namespace > 0
                          and by_namespace[namespace] >= settings.max_running_per_namespace)
        if free > 0 and not namespace_full:
            admitted.add(_key(candidate))
            free -= 1
            by_namespace[namespace] += 1
        else:
            left_behind.append(_key(candidate))
    key = _key(resource)
    if key in admitted:
        return Admission(True, 0, len(left_behind), len(running))
    return Admission(False, left_behind.index(key) + 1, len(left_behind), len(running))
