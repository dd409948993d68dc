"""The resource's status, as a pure function of its Job, the Job's pods and events, and the time.

The worker's summary (its termination message) carries the results; Kubernetes carries the rest:
exit codes and OOMKilled in container states, DeadlineExceeded / BackoffLimitExceeded in Job
conditions, image pull problems in waiting states, scheduling problems in pod conditions, pods the
Job controller could not create in its FailedCreate events. A Job that waits on a problem longer
than the operator's limit for it (Waits) ends Failed instead of waiting for its deadline.
"""

from __future__ import annotations

import datetime
import signal
from typing import Any

from optimizer.api.results import ServingOffer
from optimizer.api.serving import price, recommend
from optimizer.api.spec import ModelOptimization, TargetSpec
from optimizer.api.summary import parse_summary
from optimizer.api.units import format_size

from .job import CONTAINER, LABEL_QUEUE
from .settings import Waits

TERMINAL = ("Succeeded", "Failed")
_WAITING_PROBLEMS = {
    "ErrImagePull": "cannot pull the worker image",
    "ImagePullBackOff": "cannot pull the worker image",
    "InvalidImageName": "the worker image name is invalid",
    "CreateContainerConfigError": "the worker container cannot be configured",
    "CreateContainerError": "the worker container cannot be created",
}
# Waiting reasons that never resolve on their own: the resource fails now, not at the deadline.
_WAITING_FATAL = {
    "ErrImageNeverPull": "the worker image is not on the node and imagePullPolicy is Never: load the image "
    "onto the node (kind load docker-image, ctr images import) or set the operator's MLOPT_IMAGE_PULL_POLICY",
    "InvalidImageName": "the worker image name is invalid: fix spec.job.image or the operator's MLOPT_WORKER_IMAGE",
}
# Job condition types that decide the outcome. The Job controller writes the interim SuccessCriteriaMet /
# FailureTarget first, then removes its pod finalizers and waits for pods still terminating, and only
# then the final Complete / Failed with completionTime (seconds later, or much later when its status
# update fails, e.g. while the API server restarts). The outcome is known at the interim one.
_COMPLETE = ("Complete", "SuccessCriteriaMet")
_FAILED = ("Failed", "FailureTarget")
_ENDED = ("Complete", "Failed")
_VARIANT_KEYS = ("name", "recipe", "status", "sizeBytes", "speedup", "accuracy", "argmaxAgreement", "error")
_IMAGE_PROBLEMS = ("ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError", "CreateContainerError")


def _seconds_since(timestamp: str | None, now: datetime.datetime) -> float:
    if not timestamp:
        return 0.0
    return (now - datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))).total_seconds()


def _failed_create(events: list[dict[str, Any]]) -> str | None:
    """The newest FailedCreate message of the Job's events (why the Job controller made no pod)."""
    created = [e for e in events if e.get("reason") == "FailedCreate"]
    if not created:
        return None
    newest = max(created, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return newest.get("message") or "the Job controller could not create the worker pod"


def _kueue_pending(events: list[dict[str, Any]]) -> str | None:
    """The newest reason Kueue gives for not admitting the Job's Workload (its "Pending" event), e.g.
    "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor …"."""
    pending = [e for e in events if e.get("involvedObject", {}).get("kind") == "Workload" and e.get("reason") == "Pending"]
    if not pending:
        return None
    return max(pending, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "").get("message") or None


def _waited_too_long(status: dict[str, Any], job: dict[str, Any], pods: list[dict[str, Any]], waits: Waits,
                     now: datetime.datetime) -> dict[str, Any]:
    """A Pending status whose problem has lasted past its limit becomes Failed, saying how long it waited.
    A pod's problem is timed from that pod's creation: the replacement of a pod evicted an hour into a
    run (a drained node) gets its full wait, not none. FailedCreate is timed from the Job's startTime,
    which Kubernetes sets when the Job may first make pods and resets on each resume: a Job Kueue
    admits after an hour in its queue gets its full wait too."""
    limit = {"FailedCreate": waits.failed_create, "Unschedulable": waits.unschedulable,
             **{reason: waits.image for reason in _IMAGE_PROBLEMS}}.get(status.get("reason"))
    if status.get("phase") != "Pending" or limit is None:
        return status
    if status["reason"] == "FailedCreate":
        age = _seconds_since(job.get("status", {}).get("startTime") or job["metadata"].get("creationTimestamp"), now)
    else:
        age = _seconds_since((_latest(pods) if pods else job)["metadata"].get("creationTimestamp"), now)
    if age < limit:
        return status
    return {**status, "phase": "Failed",
            "message": f"{status['message']} (still so after {int(age)} s; the operator's limit is {limit} s)"}


def human_latency(ms: float) -> str:
    return f"{ms:.3g} ms"


def _exit_meaning(code: int) -> str:
    if code > 128:
        try:
            return f"exit code {code}, killed by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return f"exit code {code}"


def _condition(job: dict[str, Any], types: tuple[str, ...]) -> dict[str, Any] | None:
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return condition
    return None


def worker_state(pod: dict[str, Any] | None) -> dict[str, Any]:
    for status in (pod or {}).get("status", {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return status.get("state") or {}
    return {}


def _latest(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not pods:
        return None
    return max(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))


def _latest_terminated(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    ended = [p for p in pods if worker_state(p).get("terminated")]
    return worker_state(_latest(ended)).get("terminated") if ended else None


def _completing_attempt(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The terminated state of the attempt that completed the Job: the one that exited 0, or None when
    it is gone. An earlier attempt (evicted, preempted) may still be listed and may even look newer
    at the API's one-second timestamps; its message is its last log lines, never the summary."""
    succeeded = [p for p in pods if (worker_state(p).get("terminated") or {}).get("exitCode") == 0]
    return worker_state(_latest(succeeded)).get("terminated") if succeeded else None


def _variant(entry: dict[str, Any]) -> dict[str, Any]:
    out = {key: entry[key] for key in _VARIANT_KEYS if entry.get(key) is not None}
    latency = entry.get("latencyMs") or {}
    if "p50" in latency and "mean" in latency:
        out["latencyMs"] = {"p50": latency["p50"], "mean": latency["mean"]}
    return out


def _from_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The results part of status: baseline, variants, best and its printer-column strings."""
    out: dict[str, Any] = {"message": summary.get("message") or ""}
    if summary.get("reason"):
        out["reason"] = summary["reason"]
    for key in ("results", "output"):
        if summary.get(key):
            out[key] = summary[key]
    if isinstance(summary.get("artifacts"), dict) and summary["artifacts"]:
        out["artifacts"] = summary["artifacts"]
    if isinstance(summary.get("baseline"), dict):
        out["baseline"] = _variant(summary["baseline"])
    variants = [_variant(v) for v in summary.get("variants") or [] if isinstance(v, dict)]
    if variants or "variants" in summary:
        out["variants"] = variants
    if summary.get("truncated"):
        out["message"] += " (some variants left out of status; see results)"
    best_name = summary.get("best")
    if best_name:
        out["best"] = best_name
        best = next((v for v in [*variants, out.get("baseline") or {}] if v.get("name") == best_name), {})
        if best.get("sizeBytes") is not None:
            out["bestSize"] = format_size(best["sizeBytes"])
        if best.get("latencyMs"):
            out["bestLatency"] = human_latency(best["latencyMs"]["mean"])
        if best.get("speedup") is not None:
            out["bestSpeedup"] = f"{best['speedup']:.2f}x"
    return out


def _memory_limit(job: dict[str, Any]) -> str | None:
    for container in job.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []:
        if container.get("name") == CONTAINER:
            return (container.get("resources") or {}).get("limits", {}).get("memory")
    return None


def _log_tail(terminated: dict[str, Any]) -> str:
    """FallbackToLogsOnError puts the log tail in the message when there is no summary."""
    lines = [line for line in (terminated.get("message") or "").strip().splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def _failure(job: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any]:
    """Why a failed Job failed, most specific cause first."""
    failed = _condition(job, _FAILED) or {}
    terminated = _latest_terminated(pods)
    waiting = worker_state(_latest(pods)).get("waiting") or {}
    out: dict[str, Any] = {"phase": "Failed"}
    if terminated and terminated.get("exitCode") is not None:
        out["exitCode"] = terminated["exitCode"]
    summary = parse_summary(terminated.get("message", "")) if terminated else None
    deadline = job.get("spec", {}).get("activeDeadlineSeconds")
    if failed.get("reason") == "DeadlineExceeded":
        message = f"the Job ran longer than spec.job.activeDeadlineSeconds ({deadline} s) and was stopped"
        if waiting.get("reason") in _WAITING_PROBLEMS:
            message += f"; the worker never started: {waiting['reason']}: {waiting.get('message', '')}"
        return {**out, "reason": "DeadlineExceeded", "message": message}
    if summary and summary.get("phase") == "Failed":
        return {**out, **_from_summary(summary), "reason": summary.get("reason") or "OptimizationFailed"}
    if terminated and terminated.get("reason") == "OOMKilled":
        limit = _memory_limit(job)
        return {
            **out,
            "reason": "OOMKilled",
            "message": f"the worker ran out of memory (limit {limit}); raise spec.job.resources.limits.memory",
        }
    reason = failed.get("reason") or "JobFailed"
    if terminated:
        attempts = job.get("status", {}).get("failed") or 1
        message = f"the worker failed ({_exit_meaning(terminated.get('exitCode', -1))}) after {attempts} attempt(s)"
        tail = _log_tail(terminated)
        if tail:
            message += f"; last log line: {tail}"
        if reason == "BackoffLimitExceeded":
            message += f"; spec.job.backoffLimit is {job.get('spec', {}).get('backoffLimit', 0)}"
        return {**out, "reason": reason, "message": message}
    return {**out, "reason": reason, "message": failed.get("message") or "the Job failed"}


def _waiting(pod: dict[str, Any] | None) -> dict[str, Any]:
    """Pending: why the worker has not started yet, when Kubernetes says."""
    if pod is None:
        return {"phase": "Pending", "reason": "JobCreated", "message": "waiting for the worker pod"}
    waiting = worker_state(pod).get("waiting") or {}
    reason = waiting.get("reason")
    if explained := _WAITING_FATAL.get(reason) or _WAITING_PROBLEMS.get(reason):
        return {
            "phase": "Failed" if reason in _WAITING_FATAL else "Pending",
            "reason": reason,
            "message": f"{explained}: {waiting.get('message') or ''}".rstrip(": "),
        }
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return {
                "phase": "Pending",
                "reason": condition.get("reason") or "Unschedulable",
                "message": condition.get("message") or "the worker pod cannot be scheduled",
            }
    return {"phase": "Pending", "reason": "PodPending", "message": "the worker pod is starting"}


def job_finished(job: dict[str, Any]) -> bool:
    """The outcome is decided (an interim condition counts): status may say Succeeded or Failed."""
    return _condition(job, _COMPLETE + _FAILED) is not None


def job_ended(job: dict[str, Any]) -> bool:
    """Kubernetes' own end of the Job (Complete / Failed, with completionTime): no pod of it is left
    terminating. Until then the Job is still active, whatever the interim conditions say."""
    return _condition(job, _ENDED) is not None


def status_from_job(job: dict[str, Any], pods: list[dict[str, Any]], events: list[dict[str, Any]] | None = None,
                    now: datetime.datetime | None = None, waits: Waits = Waits()) -> dict[str, Any]:
    """phase, reason, message, exitCode, times and results for the resource that owns `job`."""
    status = _status(job, pods, events or [])
    return _waited_too_long(status, job, pods, waits, now or datetime.datetime.now(datetime.timezone.utc))


def _status(job: dict[str, Any], pods: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[str, Any]:
    job_status = job.get("status") or {}
    status: dict[str, Any] = {"jobName": job["metadata"]["name"]}
    if job_status.get("startTime"):
        status["startTime"] = job_status["startTime"]
    complete = _condition(job, _COMPLETE)
    failed = _condition(job, _FAILED)
    if complete or failed:
        status["completionTime"] = job_status.get("completionTime") or (complete or failed).get(
            "lastTransitionTime"
        )
    if failed:
        return {**status, **_failure(job, pods)}
    if complete:
        terminated = _completing_attempt(pods)
        summary = parse_summary(terminated.get("message", "")) if terminated else None
        status.update({"phase": "Succeeded", "reason": "Completed", "exitCode": 0})
        if summary is None:  # a pod without the operator's finalizer (an older Job), or one released by hand
            gone = "the worker's pod was deleted before its summary was read; the results are where spec.output says"
            return {**status, "message": gone if not terminated else "the worker ended without a summary; see its logs"}
        return {**status, **_from_summary(summary), "reason": summary.get("reason") or "Completed"}
    pod = _latest(pods)
    terminated = worker_state(pod).get("terminated")
    if terminated:  # this attempt ended, the Job has not decided yet (or will retry)
        return {
            **status,
            "phase": "Running",
            "reason": "AttemptEnded",
            "message": f"the worker ended ({_exit_meaning(terminated.get('exitCode', -1))}); "
            "waiting for the Job to retry or finish",
        }
    if worker_state(pod).get("running") or (pod or {}).get("status", {}).get("phase") == "Running":
        return {**status, "phase": "Running", "reason": "WorkerRunning", "message": "the worker is optimizing the model"}
    if pod is None and job.get("spec", {}).get("suspend"):
        queue = job["metadata"].get("labels", {}).get(LABEL_QUEUE, "")
        message = f"the Job is suspended until Kueue admits it (queue {queue})"
        if why := _kueue_pending(events):
            message += f": {why}"
        return {**status, "phase": "Queued", "reason": "WaitingForKueue", "message": message}
    if pod is None and (why := _failed_create(events)):
        return {**status, "phase": "Pending", "reason": "FailedCreate",
                "message": f"the Job controller cannot create the worker pod: {why}"}
    return {**status, **_waiting(pod)}


# --- spec.targets: one Job per target, one row per target, and the resource's status from the rows ---

# What a target's row keeps of its worker's summary: once the row is final its pod is released, so the
# row is where the resource's top-level results (the recommended target's) are read from afterwards.
RESULT_KEYS = ("best", "bestSize", "bestLatency", "bestSpeedup", "baseline", "variants", "results", "output",
                "artifacts")
_ROW_KEYS = ("phase", "reason", "message", "jobName", "exitCode", "startTime", "completionTime", *RESULT_KEYS)
_SERVING_KEYS = ("variant", "requestsPerSecond", "p99Ms", "latencySLOMs", "reason")


def queued_row(target: TargetSpec) -> dict[str, Any]:
    """The row of a target whose Job waits for a slot under the operator's cap."""
    return {"name": target.name, "phase": "Queued", "reason": "OverCap", "message": "waiting for a slot"}


def target_row(target: TargetSpec, status: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's row, from status_from_job of its Job: phase and why, where it ran (the node from the
    pod, the CPU from the worker's summary) and what it measured (the summary's serving figures)."""
    row = {"name": target.name, **{key: status[key] for key in _ROW_KEYS if status.get(key) is not None}}
    ran = [p for p in pods if (p.get("spec") or {}).get("nodeName")]
    if ran:
        row["node"] = _latest(ran)["spec"]["nodeName"]
    terminated = _completing_attempt(pods) or _latest_terminated(pods)
    summary = parse_summary(terminated.get("message", "")) if terminated else None
    environment = (summary or {}).get("environment")
    if isinstance(environment, dict) and environment.get("cpu"):
        row["cpu"] = str(environment["cpu"])[:200]
    serving = (summary or {}).get("serving") if status.get("phase") == "Succeeded" else None
    if isinstance(serving, dict):
        row["serving"] = {key: serving[key] for key in _SERVING_KEYS if serving.get(key) is not None}
    if target.pricePerHour is not None:
        row["pricePerHour"] = target.pricePerHour
    return row


def _offer(row: dict[str, Any], target: TargetSpec) -> ServingOffer:
    serving = row["serving"]
    return ServingOffer(target=row["name"], variant=serving.get("variant"),
                        requestsPerSecond=serving.get("requestsPerSecond"), p99Ms=serving.get("p99Ms"),
                        pricePerHour=target.pricePerHour, lost=serving.get("reason"))


def _phase(rows: list[dict[str, Any]]) -> str:
    """Running while any target runs; Succeeded once all are final and one succeeded; Failed when all failed."""
    phases = [row.get("phase") for row in rows]
    if "Running" in phases:
        return "Running"
    if all(phase in TERMINAL for phase in phases):
        return "Succeeded" if "Succeeded" in phases else "Failed"
    return "Pending" if "Pending" in phases else "Queued"


def _progress(rows: list[dict[str, Any]]) -> str:
    return "targets: " + ", ".join(
        f"{row['name']} {row.get('phase')}" + (f" ({row['reason']})" if row.get("phase") not in ("Running", "Succeeded")
                                               and row.get("reason") else "") for row in rows)


def _recommended_message(recommendation: Any, rows: list[dict[str, Any]]) -> str:
    if recommendation is None:
        return "no target met the latency SLO (see each target's serving reason)"
    offer = next(o for o in recommendation.offers
                 if (o.target, o.variant) == (recommendation.target, recommendation.variant))
    message = (f"recommended {recommendation.target}/{recommendation.variant}: {offer.requestsPerSecond:.1f} "
               f"requests/s per pod at p99 {offer.p99Ms or 0:.3g} ms")
    if offer.costPerMillion is not None:
        message += f", {offer.costPerMillion:.4g} per million inferences"
    if offer.replicas is not None:
        message += f", {offer.replicas} replica(s) for {recommendation.demand:g} requests/s"
        if offer.costPerHour is not None:
            message += f" at {offer.costPerHour:.4g}/h"
    return message + f" ({recommendation.basis})"


def status_from_targets(spec: ModelOptimization, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The resource's status from its targets' rows (in the spec's order): the phase, the rows priced, the
    recommendation (optimizer.api.serving.recommend over the finished targets' offers, as the worker
    decides locally) and the top-level results of the recommended target (else the first that succeeded)."""
    targets = {target.name: target for target in spec.spec.targets or []}
    offers = [_offer(row, targets[row["name"]]) for row in rows if row.get("phase") == "Succeeded" and row.get("serving")]
    recommendation = recommend(offers, spec.spec.demand) if offers else None
    priced = {o.target: o for o in (recommendation.offers if recommendation else
                                    [price(o, spec.spec.demand) for o in offers])}
    rows = [{**row, **{key: getattr(priced[row["name"]], key) for key in ("costPerMillion", "replicas", "costPerHour")
                       if row["name"] in priced and getattr(priced[row["name"]], key) is not None}} for row in rows]
    phase = _phase(rows)
    status: dict[str, Any] = {"phase": phase, "targets": rows}
    if recommendation is not None:
        status["recommendation"] = recommendation.model_dump(exclude_none=True)
        status["recommended"] = f"{recommendation.target}/{recommendation.variant}"
    succeeded = [row for row in rows if row.get("phase") == "Succeeded"]
    source = next((row for row in succeeded if recommendation and row["name"] == recommendation.target),
                  succeeded[0] if succeeded else None)
    if source is not None:
        status.update({key: source[key] for key in RESULT_KEYS if key in source})
    starts = [row["startTime"] for row in rows if row.get("startTime")]
    if starts:
        status["startTime"] = min(starts)
    failed = [row for row in rows if row.get("phase") == "Failed"]
    if phase in TERMINAL:
        ends = [row["completionTime"] for row in rows if row.get("completionTime")]
        if ends:
            status["completionTime"] = max(ends)
    if phase == "Succeeded":
        measured = any("serving" in row for row in succeeded)  # off with benchmark.serving.enabled: false
        message = (_recommended_message(recommendation, rows) if measured
                   else f"{len(succeeded)} of {len(rows)} target(s) succeeded")
        if failed:
            message += "; failed: " + ", ".join(f"{row['name']} ({row.get('reason')})" for row in failed)
        return {**status, "reason": "Completed", "message": message}
    if phase == "Failed":
        reasons = {row.get("reason") for row in rows}
        reason = reasons.pop() if len(reasons) == 1 else "TargetsFailed"
        message = "every target failed: " + "; ".join(
            f"{row['name']}: {row.get('reason')}: {row.get('message', '')}" for row in rows)
        return {**status, "reason": reason or "TargetsFailed", "message": message[:3000]}
    if phase == "Pending":
        first = next(row for row in rows if row.get("phase") == "Pending")
        return {**status, "reason": first.get("reason") or "PodPending",
                "message": f"{first['name']}: {first.get('message', '')}; {_progress(rows)}"}
    reason = "WorkerRunning" if phase == "Running" else "OverCap"
    return {**status, "reason": reason, "message": _progress(rows)}


def conditions(
    status: dict[str, Any], generation: int, previous: list[dict[str, Any]] | None, now: str
) -> list[dict[str, Any]]:
    """Running / Succeeded / Failed conditions; lastTransitionTime moves only when status flips."""
    phase = status.get("phase", "Pending")
    before = {c["type"]: c for c in previous or []}
    out = []
    for kind in ("Running", "Succeeded", "Failed"):
        true = phase == kind
        condition = {
            "type": kind,
            "status": "True" if true else "False",
            "reason": (status.get("reason") or phase) if true else phase,
            "message": (status.get("message") or "") if true else "",
            "observedGeneration": generation,
        }
        old = before.get(kind)
        unchanged = old is not None and old.get("status") == condition["status"]
        condition["lastTransitionTime"] = old["lastTransitionTime"] if unchanged else now
        out.append(condition)
    return out
