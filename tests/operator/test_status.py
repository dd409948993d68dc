import json

import pytest

from mlopt_operator.status import conditions, human_latency, status_from_job, status_from_targets, target_row
from optimizer.api.crd import ModelOptimizationStatus
from optimizer.api.spec_loader import parse_spec
from optimizer.api.summary import failure_summary
from optimizer.api.units import format_size

SUCCESS = json.dumps({
    "v": 1, "phase": "Succeeded", "message": "best ort-int8-static-dynamic: 6.07x faster, 7.9 MB",
    "best": "ort-int8-static-dynamic",
    "baseline": {"name": "pytorch-fp32", "recipe": "pytorch", "status": "ok", "sizeBytes": 31400000,
                 "latencyMs": {"p50": 24.1, "mean": 24.4}, "speedup": 1.0, "accuracy": 0.98},
    "variants": [
        {"name": "onnx-fp32", "recipe": "onnx-fp32", "status": "ok", "sizeBytes": 31500000,
         "latencyMs": {"p50": 13.0, "mean": 13.2}, "speedup": 1.85, "accuracy": 0.98, "argmaxAgreement": 1.0},
        {"name": "ort-int8-static-dynamic", "recipe": "ort-int8-static-dynamic", "status": "ok",
         "sizeBytes": 7912345, "latencyMs": {"p50": 3.98, "mean": 4.02}, "speedup": 6.07, "accuracy": 0.975},
        {"name": "onnx-fp16", "recipe": "onnx-fp16", "status": "skipped", "error": "FP16 needs CUDA"},
    ],
    "results": "s3://team-models/crnn/results.json",
    "output": "s3://team-models/crnn/",
    "artifacts": {"best": {"uri": "s3://team-models/crnn/models/ort-int8-static-dynamic.onnx",
                           "sizeBytes": 7912345, "sha256": "ab" * 32}},
})


def job(*conditions_, failed=0, backoff=0, deadline=3600, memory="8Gi"):
    return {
        "metadata": {"name": "crnn-g1", "labels": {"mlopt.io/generation": "1"}},
        "spec": {"backoffLimit": backoff, "activeDeadlineSeconds": deadline,
                 "template": {"spec": {"containers": [{"name": "worker", "resources": {"limits": {"memory": memory}}}]}}},
        "status": {"startTime": "2026-01-01T00:00:00Z", "failed": failed,
                   "conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                                   "lastTransitionTime": "2026-01-01T00:05:00Z"} for t, r, m in conditions_]},
    }


def pod(state, name="crnn-g1-abcde", created="2026-01-01T00:00:01Z", phase="Running", pod_conditions=()):
    return {"metadata": {"name": name, "creationTimestamp": created},
            "status": {"phase": phase, "conditions": list(pod_conditions),
                       "containerStatuses": [{"name": "worker", "state": state}] if state else []}}


def terminated(code, message="", reason="Error"):
    return {"terminated": {"exitCode": code, "reason": reason, "message": message}}


def test_pending_without_pods():
    status = status_from_job(job(), [])
    assert status["phase"] == "Pending" and status["jobName"] == "crnn-g1"


def test_running():
    status = status_from_job(job(), [pod({"running": {"startedAt": "x"}})])
    assert status["phase"] == "Running"
    assert status["startTime"] == "2026-01-01T00:00:00Z"


def test_succeeded_with_results_and_printer_strings():
    status = status_from_job(job(("Complete", "", "")), [pod(terminated(0, SUCCESS, "Completed"), phase="Succeeded")])
    assert status["phase"] == "Succeeded"
    assert status["exitCode"] == 0
    assert status["completionTime"] == "2026-01-01T00:05:00Z"
    assert status["best"] == "ort-int8-static-dynamic"
    assert (status["bestSize"], status["bestLatency"], status["bestSpeedup"]) == ("7.9 MB", "4.02 ms", "6.07x")
    assert status["baseline"]["latencyMs"] == {"p50": 24.1, "mean": 24.4}
    assert [v["name"] for v in status["variants"]] == ["onnx-fp32", "ort-int8-static-dynamic", "onnx-fp16"]
    assert status["variants"][0]["argmaxAgreement"] == 1.0
    assert status["variants"][2] == {"name": "onnx-fp16", "recipe": "onnx-fp16", "status": "skipped",
                                     "error": "FP16 needs CUDA"}
    assert status["results"] == "s3://team-models/crnn/results.json" and status["output"] == "s3://team-models/crnn/"
    assert status["artifacts"]["best"]["uri"] == "s3://team-models/crnn/models/ort-int8-static-dynamic.onnx"
    assert "6.07x" in status["message"]


def test_an_evicted_attempt_listed_beside_the_one_that_completed_never_hides_its_results():
    """Same-second timestamps: the evicted pod (SIGTERM, exit 143, its last log lines as the message)
    may sort as the newer one; the Job completed through the pod that exited 0."""
    disrupted = [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]
    evicted = pod(terminated(143, "Traceback ... KeyboardInterrupt"), name="crnn-g1-zzzzz", phase="Failed",
                  pod_conditions=disrupted)
    completed = pod(terminated(0, SUCCESS, "Completed"), name="crnn-g1-aaaaa", phase="Succeeded")
    status = status_from_job(job(("Complete", "", "")), [evicted, completed])
    assert status["phase"] == "Succeeded" and status["best"] == "ort-int8-static-dynamic" and status["variants"]


def test_a_completed_job_whose_exit_0_pod_is_gone_never_takes_an_evicted_attempt_for_it():
    """Only a pod without the operator's finalizer can be gone (an older Job, or released by hand): status
    says the summary was lost, not that the worker ended without one, and not the evicted attempt's 143."""
    evicted = pod(terminated(143, "Traceback ... SystemExit: 143"), phase="Failed")
    status = status_from_job(job(("Complete", "", "")), [evicted])
    assert (status["phase"], status["exitCode"]) == ("Succeeded", 0), status
    assert "deleted before its summary was read" in status["message"]


def test_status_fits_the_crd_status_model():
    from optimizer.api.crd import ModelOptimizationStatus

    status = status_from_job(job(("Complete", "", "")), [pod(terminated(0, SUCCESS, "Completed"))])
    status["conditions"] = conditions(status, 1, None, "2026-01-01T00:05:00Z")
    ModelOptimizationStatus.model_validate({**status, "observedGeneration": 1})


def test_model_that_cannot_load():
    summary = failure_summary("ModelLoadFailed", "cannot read model.pt: no such file")
    status = status_from_job(job(("Failed", "PodFailurePolicy", "exit code 1")), [pod(terminated(1, summary), phase="Failed")])
    assert status["phase"] == "Failed"
    assert status["reason"] == "ModelLoadFailed"
    assert "no such file" in status["message"]
    assert status["exitCode"] == 1


def test_oom_killed():
    status = status_from_job(job(("Failed", "BackoffLimitExceeded", ""), memory="3Gi"),
                             [pod(terminated(137, "", "OOMKilled"), phase="Failed")])
    assert status["reason"] == "OOMKilled"
    assert "3Gi" in status["message"] and "limits.memory" in status["message"]
    assert status["exitCode"] == 137


def test_killed_worker_reports_exit_code_and_backoff():
    log_tail = "step 3/8 benchmark\nquantizing ort-int8-static\n"
    status = status_from_job(job(("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
                                 failed=1), [pod(terminated(137, log_tail), phase="Failed")])
    assert status["phase"] == "Failed"
    assert status["reason"] == "BackoffLimitExceeded"
    assert status["exitCode"] == 137
    assert "exit code 137, killed by SIGKILL" in status["message"]
    assert "quantizing ort-int8-static" in status["message"]
    assert "backoffLimit is 0" in status["message"]


def test_deadline_exceeded():
    status = status_from_job(job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline"),
                                 deadline=60), [])
    assert status["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds (60 s)" in status["message"]


def test_deadline_while_the_image_cannot_be_pulled():
    waiting = {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"nope:1\""}}
    status = status_from_job(job(("Failed", "DeadlineExceeded", "")), [pod(waiting, phase="Pending")])
    assert status["reason"] == "DeadlineExceeded" and "ImagePullBackOff" in status["message"]


def test_image_pull_failure_is_explained_while_pending():
    waiting = {"waiting": {"reason": "ErrImagePull", "message": "pull access denied for nope"}}
    status = status_from_job(job(), [pod(waiting, phase="Pending")], now=_at(5))  # 4 s after the pod was created
    assert status["phase"] == "Pending"
    assert status["reason"] == "ErrImagePull"
    assert "cannot pull the worker image: pull access denied" in status["message"]


def test_image_never_pulled_fails_at_once_not_at_the_deadline():
    waiting = {"waiting": {"reason": "ErrImageNeverPull",
                           "message": 'Container image "mlopt/worker:nope" is not present with pull policy of Never'}}
    status = status_from_job(job(), [pod(waiting, phase="Pending")])
    assert status["phase"] == "Failed" and status["reason"] == "ErrImageNeverPull"
    assert "imagePullPolicy is Never" in status["message"] and "mlopt/worker:nope" in status["message"]


def test_unschedulable_is_explained():
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}
    status = status_from_job(job(), [pod(None, phase="Pending", pod_conditions=[cond])])
    assert status["reason"] == "Unschedulable" and "nvidia.com/gpu" in status["message"]


def test_failed_attempt_before_retry_is_still_running():
    status = status_from_job(job(backoff=2), [pod(terminated(137), phase="Failed")])
    assert status["phase"] == "Running" and "137" in status["message"]


def test_latest_pod_wins():
    old = pod(terminated(137), name="a", created="2026-01-01T00:00:01Z", phase="Failed")
    new = pod({"running": {}}, name="b", created="2026-01-01T00:01:00Z")
    assert status_from_job(job(backoff=1), [new, old])["phase"] == "Running"


def test_new_failure_conditions_of_the_job_controller_count():
    """Current Job controllers set FailureTarget before Failed (and SuccessCriteriaMet before Complete)."""
    status = status_from_job(job(("FailureTarget", "BackoffLimitExceeded", "")), [pod(terminated(3), phase="Failed")])
    assert status["phase"] == "Failed" and status["exitCode"] == 3
    status = status_from_job(job(("SuccessCriteriaMet", "CompletionsReached", "")), [pod(terminated(0, SUCCESS))])
    assert status["phase"] == "Succeeded"


def test_conditions_keep_transition_time_until_status_flips():
    first = conditions({"phase": "Running", "reason": "WorkerRunning", "message": "m"}, 2, None, "t1")
    assert {c["type"]: c["status"] for c in first} == {"Running": "True", "Succeeded": "False", "Failed": "False"}
    assert all(c["observedGeneration"] == 2 and c["lastTransitionTime"] == "t1" for c in first)
    second = conditions({"phase": "Succeeded", "reason": "Completed", "message": "done"}, 2, first, "t2")
    times = {c["type"]: c["lastTransitionTime"] for c in second}
    assert times == {"Running": "t2", "Succeeded": "t2", "Failed": "t1"}
    assert next(c for c in second if c["type"] == "Succeeded")["reason"] == "Completed"


def test_human_strings():
    # bestSize is written by the one size formatter the terminal and report.md use too
    assert format_size(7_912_345) == "7.9 MB"
    assert format_size(34_200) == "34.2 kB"
    assert (format_size(999_960), format_size(2_048_000_000), format_size(512), format_size(None)) == (
        "1.0 MB", "2.0 GB", "512 B", "—")
    assert human_latency(4.0234) == "4.02 ms"
    assert human_latency(0.04521) == "0.0452 ms"


def _created(job_, at="2026-01-01T00:00:00Z"):
    job_["metadata"]["creationTimestamp"] = at
    return job_


def _at(seconds):
    import datetime

    return datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(seconds=seconds)


FAILED_CREATE = {"reason": "FailedCreate", "lastTimestamp": "2026-01-01T00:00:03Z",
                 "message": 'Error creating: pods "crnn-g1-x" is forbidden: error looking up service account team/nope'}


def test_a_job_that_cannot_create_its_pod_says_why_then_fails_after_the_wait():
    from mlopt_operator.settings import Waits

    waiting = status_from_job(_created(job()), [], [FAILED_CREATE], now=_at(20), waits=Waits(failed_create=60))
    assert (waiting["phase"], waiting["reason"]) == ("Pending", "FailedCreate")
    assert "service account team/nope" in waiting["message"]
    failed = status_from_job(_created(job()), [], [FAILED_CREATE], now=_at(61), waits=Waits(failed_create=60))
    assert (failed["phase"], failed["reason"]) == ("Failed", "FailedCreate")
    assert "after 61 s" in failed["message"] and "limit is 60 s" in failed["message"]
    assert status_from_job(_created(job()), [], [], now=_at(61))["reason"] == "JobCreated"  # no event: just waiting
    # Admitted by Kueue an hour after it was created (startTime is set, or reset, on resume): a full wait.
    admitted = _created(job())
    admitted["status"]["startTime"] = "2026-01-01T01:00:00Z"
    waits = Waits(failed_create=60)
    assert status_from_job(admitted, [], [FAILED_CREATE], now=_at(3600 + 20), waits=waits)["phase"] == "Pending"
    assert status_from_job(admitted, [], [FAILED_CREATE], now=_at(3600 + 61), waits=waits)["phase"] == "Failed"


def test_unschedulable_and_image_problems_fail_only_after_their_waits():
    from mlopt_operator.settings import Waits

    waits = Waits(image=30, unschedulable=120)
    unschedulable = pod({}, phase="Pending", pod_conditions=[{"type": "PodScheduled", "status": "False",
                                                             "reason": "Unschedulable", "message": "0/1 nodes fit"}])
    assert status_from_job(_created(job()), [unschedulable], now=_at(100), waits=waits)["phase"] == "Pending"
    late = status_from_job(_created(job()), [unschedulable], now=_at(121), waits=waits)
    assert (late["phase"], late["reason"]) == ("Failed", "Unschedulable") and "0/1 nodes fit" in late["message"]
    backoff = pod({"waiting": {"reason": "ImagePullBackOff", "message": "back-off pulling"}}, phase="Pending")
    assert status_from_job(_created(job()), [backoff], now=_at(10), waits=waits)["phase"] == "Pending"
    assert status_from_job(_created(job()), [backoff], now=_at(31), waits=waits)["phase"] == "Failed"
    running = pod({"running": {"startedAt": "x"}})
    assert status_from_job(_created(job()), [running], now=_at(10_000), waits=waits)["phase"] == "Running"
    # A replacement pod (the first was evicted an hour in) waits its own full time, from its creation.
    replacement = pod({}, phase="Pending", created="2026-01-01T01:00:00Z",
                      pod_conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                       "message": "0/1 nodes fit"}])
    assert status_from_job(_created(job()), [replacement], now=_at(3600 + 100), waits=waits)["phase"] == "Pending"
    assert status_from_job(_created(job()), [replacement], now=_at(3600 + 121), waits=waits)["phase"] == "Failed"


def test_a_job_suspended_for_kueue_is_queued():
    suspended = _created(job())
    suspended["spec"]["suspend"] = True
    suspended["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "team-queue"
    status = status_from_job(suspended, [], now=_at(100_000))
    assert (status["phase"], status["reason"]) == ("Queued", "WaitingForKueue") and "team-queue" in status["message"]


def test_a_job_kueue_cannot_admit_yet_says_why_from_its_workloads_pending_event():
    suspended = _created(job())
    suspended["spec"]["suspend"] = True
    suspended["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "team-queue"
    pending = [
        {"involvedObject": {"kind": "Workload", "name": "job-x-g1-abcde"}, "reason": "Pending",
         "lastTimestamp": "2026-01-01T00:00:01Z", "message": "couldn't assign flavors to pod set main: old"},
        {"involvedObject": {"kind": "Workload", "name": "job-x-g1-abcde"}, "reason": "Pending",
         "lastTimestamp": "2026-01-01T00:00:09Z",
         "message": "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor f, 1 more needed"},
        {"involvedObject": {"kind": "Job", "name": "x-g1"}, "reason": "Suspended", "message": "Kueue suspended it"},
    ]
    status = status_from_job(suspended, [], pending, now=_at(100))
    assert (status["phase"], status["reason"]) == ("Queued", "WaitingForKueue")
    assert status["message"] == ("the Job is suspended until Kueue admits it (queue team-queue): couldn't assign flavors "
                                 "to pod set main: insufficient unused quota for cpu in flavor f, 1 more needed")


# --------------------------------------------------------------------------------------------------
# spec.targets: one row per target and the resource's status from the rows


def targets_spec(demand=None, **extra):
    spec = {"model": {"source": "zoo:digits"}, "targets": [
        {"name": "amx", "pricePerHour": 0.40}, {"name": "avx2", "pricePerHour": 0.10}, {"name": "gpu", **extra}]}
    if demand:
        spec["demand"] = demand
    return parse_spec({"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "m"},
                       "spec": spec}, "test")


def served(variant, rps, p99, best="ort-int8-static-dynamic"):
    summary = json.loads(SUCCESS)
    summary["best"] = best
    summary.update(target="x", environment={"cpu": "Intel Xeon 8480+ (amx_int8 avx512_vnni)"},
                   serving={"variant": variant, "requestsPerSecond": rps, "p99Ms": p99, "latencySLOMs": 50.0})
    return json.dumps(summary)


def finished_row(spec, name, summary):
    the_pod = pod(terminated(0, summary, "Completed"), phase="Succeeded")
    the_pod["spec"] = {"nodeName": f"node-{name}"}
    status = status_from_job(job(("Complete", "", "")), [the_pod])
    return target_row(next(t for t in spec.spec.targets if t.name == name), status, [the_pod])


UNSCHEDULABLE = {"name": "gpu", "phase": "Failed", "reason": "Unschedulable",
                 "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. "
                            "(still so after 601 s; the operator's limit is 600 s)"}


def test_a_targets_row_says_where_it_ran_and_what_it_sustained_within_the_slo():
    spec = targets_spec()
    row = finished_row(spec, "amx", served("ort-int8-static-dynamic", 800.0, 12.5))
    assert (row["name"], row["phase"], row["jobName"], row["node"]) == ("amx", "Succeeded", "crnn-g1", "node-amx")
    assert row["cpu"] == "Intel Xeon 8480+ (amx_int8 avx512_vnni)" and row["pricePerHour"] == 0.40
    assert row["serving"] == {"variant": "ort-int8-static-dynamic", "requestsPerSecond": 800.0, "p99Ms": 12.5,
                              "latencySLOMs": 50.0}
    assert (row["best"], row["bestLatency"], row["bestSize"]) == ("ort-int8-static-dynamic", "4.02 ms", "7.9 MB")
    assert row["variants"] and row["baseline"]  # the row keeps the results: its pod may be released now


def test_two_targets_succeed_one_is_unschedulable_the_cheapest_for_the_demand_is_recommended():
    spec = targets_spec(demand=1000)
    rows = [finished_row(spec, "amx", served("ort-int8-static-dynamic", 800.0, 12.5)),
            finished_row(spec, "avx2", served("onnx-fp32", 150.0, 40.0, best="onnx-fp32")), UNSCHEDULABLE]
    status = status_from_targets(spec, rows)
    # amx: 2 pods x 0.40 = 0.80/h; avx2: 7 pods x 0.10 = 0.70/h
    assert status["phase"] == "Succeeded" and status["recommended"] == "avx2/onnx-fp32"
    assert status["recommendation"]["basis"] == "cost per hour at the demand"
    amx, avx2, gpu = status["targets"]
    assert (amx["replicas"], amx["costPerHour"], avx2["replicas"], avx2["costPerHour"]) == (2, 0.80, 7, pytest.approx(0.70))
    assert avx2["costPerMillion"] == pytest.approx(0.10 / (150 * 3600) * 1e6)
    assert gpu == UNSCHEDULABLE  # the failed one keeps its reason and the scheduler's message
    assert "2 replica(s) cost 0.8/h" in next(o["lost"] for o in status["recommendation"]["offers"] if o["target"] == "amx")
    assert status["best"] == "onnx-fp32" and status["bestSpeedup"] == "1.85x"  # the recommended target's results
    assert "recommended avx2/onnx-fp32" in status["message"] and "failed: gpu (Unschedulable)" in status["message"]
    ModelOptimizationStatus.model_validate(status)  # every field is in the CRD's status schema: none is pruned


def test_the_resource_runs_while_any_target_runs_and_fails_only_when_all_failed():
    spec = targets_spec()
    done = finished_row(spec, "amx", served("ort-int8-static-dynamic", 800.0, 12.5))
    running = {"name": "avx2", "phase": "Running", "reason": "WorkerRunning"}
    pending = {"name": "gpu", "phase": "Pending", "reason": "Unschedulable", "message": "0/1 nodes are available"}
    status = status_from_targets(spec, [done, running, pending])
    assert status["phase"] == "Running" and status["recommended"] == "amx/ort-int8-static-dynamic"  # so far
    assert "gpu Pending (Unschedulable)" in status["message"]
    waiting = status_from_targets(spec, [done, {**running, "phase": "Succeeded", "reason": "Completed"}, pending])
    assert (waiting["phase"], waiting["reason"]) == ("Pending", "Unschedulable")  # rechecked until the wait ends
    assert waiting["message"].startswith("gpu: 0/1 nodes are available")
    failed = status_from_targets(spec, [{**UNSCHEDULABLE, "name": n} for n in ("amx", "avx2", "gpu")])
    assert (failed["phase"], failed["reason"]) == ("Failed", "Unschedulable") and "recommendation" not in failed
    assert failed["message"].startswith("every target failed: amx: Unschedulable: 0/1 nodes")


def test_no_target_meeting_the_slo_succeeds_without_a_recommendation_and_says_why():
    spec = targets_spec()
    summary = json.loads(served(None, None, None))
    summary["serving"] = {"latencySLOMs": 1.0, "reason": "cannot meet: the fastest variant's single request takes 3.98 ms"}
    rows = [finished_row(spec, "amx", json.dumps(summary)), {**UNSCHEDULABLE, "name": "avx2"}, UNSCHEDULABLE]
    status = status_from_targets(spec, rows)
    assert status["phase"] == "Succeeded" and "recommended" not in status and "recommendation" not in status
    assert status["message"].startswith("no target met the latency SLO")
    assert status["targets"][0]["serving"]["reason"].startswith("cannot meet")
    assert status["best"] == "ort-int8-static-dynamic"  # the first target that succeeded
