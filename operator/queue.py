"""The operator's queue: which waiting ModelOptimizations may start a Job now, as a pure function.

Benchmark pods that share nodes disturb each other's timings, so at most `max_running` run in the
cluster and `max_running_per_namespace` in one namespace (0 = no cap). The rest wait in phase
Queued, FIFO by creation within a priority (the PriorityClass value of spec.job.priorityClassName,
higher first). Resources with spec.job.queueName are left to Kueue and neither wait here nor count.

The cap counts Jobs, not resources: a resource with spec.targets needs one slot per target. Its
targets are admitted one by one as slots free, in the spec's order, and the resource keeps its place
at the head of the line until all have started. Not all-or-nothing: a resource with more targets than
the cap would then never start, and a two-target resource would wait for two free slots at once while
single Jobs behind it (FIFO) could not pass it either, leaving slots idle.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from .job import LABEL_GENERATION, LABEL_NAME, LABEL_QUEUE, LABEL_TARGET, name_label
from .settings import Settings
from .status import TERMINAL, job_ended

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Admission:
    admitted: bool  # at least one Job may start now
    slots: int  # how many of the resource's Jobs may start now (its targets, in the spec's order)
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


def unstarted_targets(resource: dict[str, Any], jobs: list[dict[str, Any]]) -> list[str]:
    """The names of the resource's targets whose Job for the current generation does not exist and whose
    outcome is not recorded (a target that failed before its Job ended, e.g. unschedulable, has its Job
    deleted and a final row: it is never started again)."""
    meta = resource["metadata"]
    generation = str(meta.get("generation"))
    status = resource.get("status") or {}
    final = {row.get("name") for row in status.get("targets") or [] if row.get("phase") in TERMINAL} \
        if str(status.get("observedGeneration")) == generation else set()
    made = {job["metadata"]["labels"].get(LABEL_TARGET) for job in jobs
            if job["metadata"].get("namespace") == meta.get("namespace")
            and job["metadata"]["labels"].get(LABEL_NAME) == name_label(meta["name"])
            and job["metadata"]["labels"].get(LABEL_GENERATION) == generation}
    targets = [t.get("name") for t in (resource.get("spec") or {}).get("targets") or []]
    return [name for name in targets if name not in made and name not in final]


def _needed(resource: dict[str, Any], jobs: list[dict[str, Any]]) -> int:
    """Slots the resource still needs: one without targets, one per unstarted target with them."""
    if not (resource.get("spec") or {}).get("targets"):
        return 1
    return len(unstarted_targets(resource, jobs))


def admit(resource: dict[str, Any], resources: list[dict[str, Any]], jobs: list[dict[str, Any]],
          settings: Settings, priority: Callable[[str | None], int]) -> Admission:
    """Whether `resource` may start its Job now, given every served resource and every worker Job."""
    running = [job for job in jobs if job_running(job)]
    by_namespace = Counter(job["metadata"]["namespace"] for job in running)
    queue = [r for r in resources if waiting(r) and _needed(r, jobs) > 0]
    if _key(resource) not in {_key(r) for r in queue}:
        queue.append(resource)

    def order(r: dict[str, Any]):
        job = (r.get("spec") or {}).get("job") or {}
        return (-priority(job.get("priorityClassName")), r["metadata"].get("creationTimestamp") or "", *_key(r))

    uncapped = 1 << 30
    free = settings.max_running - len(running) if settings.max_running > 0 else uncapped
    left_behind: list[Key] = []
    granted: dict[Key, int] = {}
    for candidate in sorted(queue, key=order):
        namespace = candidate["metadata"]["namespace"]
        room = (settings.max_running_per_namespace - by_namespace[namespace]
                if settings.max_running_per_namespace > 0 else uncapped)
        need = _needed(candidate, jobs)
        grant = max(0, min(need, free, room))
        if grant:
            granted[_key(candidate)] = grant
            free -= grant
            by_namespace[namespace] += grant
        if grant < need:  # still waits for the rest of its targets
            left_behind.append(_key(candidate))
    key = _key(resource)
    if key in granted:
        return Admission(True, granted[key], 0, len(left_behind), len(running))
    position = left_behind.index(key) + 1 if key in left_behind else 0  # 0: nothing left to start
    return Admission(False, 0, position, len(left_behind), len(running))
