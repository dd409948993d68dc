"""Every handler path, against an in-memory API (a stand-in for the API server, named as such: the
same paths run for real against the control plane in tests/e2e/test_operator.py)."""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import logging

import kopf
import pytest

from mlopt_operator import handlers
from mlopt_operator.cluster import JobRefused
from mlopt_operator.policy import PolicySource
from mlopt_operator.settings import Settings, Waits

LOG = logging.getLogger("test")


class InMemoryApi:
    """The few API calls the handlers make (mlopt_operator.cluster.Cluster), on dicts in memory."""

    def __init__(self):
        self.store: dict[tuple[str, str], dict] = {}
        self.jobs_by_name: dict[tuple[str, str], dict] = {}
        self.pods_by_job: dict[str, list[dict]] = {}
        self.events_by_job: dict[str, list[dict]] = {}
        self.refuse: JobRefused | None = None
        self.created: list[str] = []
        self.create_timeouts: list[float] = []
        self.deleted: list[str] = []
        self.released: list[str] = []  # pods whose mlopt.io/summary finalizer the operator removed
        self.policy_text: str | None = None  # the mlopt-policy ConfigMap's policy.yaml; None: no ConfigMap

    def add(self, name, generation=1, namespace="team", created="2026-01-01T00:00:00Z", **spec):
        body = {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization",
                "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": generation,
                             "creationTimestamp": created},
                "spec": {"model": {"source": "zoo:digits"}, **spec}}
        self.store[(namespace, name)] = body
        return body

    def configmap(self, namespace, name):
        return None if self.policy_text is None else {"data": {"policy.yaml": self.policy_text}}

    def get_resource(self, namespace, name):
        found = self.store.get((namespace, name))
        return copy.deepcopy(found) if found else None

    def patch_status(self, namespace, name, status):
        current = self.store[(namespace, name)].setdefault("status", {})
        for key, value in status.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value

    def _labelled(self, namespace, name, generation=None):
        for job in self.jobs_by_name.values():
            labels = job["metadata"]["labels"]
            if job["metadata"]["namespace"] == namespace and labels["mlopt.io/name"] == name and (
                    generation is None or labels["mlopt.io/generation"] == str(generation)):
                yield job

    def jobs(self, namespace, name, generation=None):
        return [copy.deepcopy(j) for j in self._labelled(namespace, name, generation)]

    def resources(self, namespaces):
        return [copy.deepcopy(r) for r in self.store.values()]

    def worker_jobs(self, namespaces):
        return [copy.deepcopy(j) for j in self.jobs_by_name.values()]

    def job_events(self, namespace, job_name):
        return self.events_by_job.get(job_name, [])

    def workload_events(self, job):
        return self.events_by_job.get(f"workload-of-{job['metadata']['name']}", [])

    def priority(self, class_name):
        return 0

    def pods(self, namespace, job_name):
        return copy.deepcopy(self.pods_by_job.get(job_name, []))

    def make_pod(self, job_name, namespace="team"):
        """A running worker pod, made as the Job controller makes it: labels, annotations and finalizers
        copied from the Job's pod template (kubernetes pkg/controller GetPodFromTemplate)."""
        template = self.jobs_by_name[(namespace, job_name)]["spec"]["template"]["metadata"]
        pods = self.pods_by_job.setdefault(job_name, [])
        pod = {"metadata": {"name": f"{job_name}-{len(pods)}", "namespace": namespace,
                            "creationTimestamp": f"2026-01-01T00:00:{len(pods):02d}Z",
                            "labels": {**template["labels"], "batch.kubernetes.io/job-name": job_name},
                            "annotations": dict(template.get("annotations") or {}),
                            "finalizers": list(template.get("finalizers") or [])},
               "status": {"phase": "Running", "containerStatuses": [{"name": "worker", "state": {"running": {"startedAt": "2026-01-01T00:00:30Z"}}}]}}
        pods.append(pod)
        return pod

    @staticmethod
    def end_pod(pod, exit_code, message=""):
        """The kubelet's last word on the pod: phase and the worker's terminated state with its message."""
        pod["status"] = {"phase": "Succeeded" if exit_code == 0 else "Failed", "containerStatuses": [
            {"name": "worker", "state": {"terminated": {"exitCode": exit_code, "message": message}}}]}

    def job_condition(self, job_name, kind, namespace="team"):
        self.jobs_by_name[(namespace, job_name)].setdefault("status", {}).setdefault("conditions", []).append(
            {"type": kind, "status": "True", "lastTransitionTime": "2026-01-01T00:01:00Z"})

    def _drop_when_free(self, pod):
        if pod["metadata"].get("deletionTimestamp") and not pod["metadata"].get("finalizers"):
            for pods in self.pods_by_job.values():
                pods[:] = [p for p in pods if p is not pod]

    def delete_pod(self, pod):
        """DELETE (an eviction does the same): a pod with finalizers stays, marked; one without is gone."""
        pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:02:00Z"
        self._drop_when_free(pod)

    def release_pod(self, namespace, name):
        for pod in [p for pods in self.pods_by_job.values() for p in pods if p["metadata"]["name"] == name]:
            pod["metadata"]["finalizers"] = [f for f in pod["metadata"]["finalizers"] if f != "mlopt.io/summary"]
            self.released.append(name)
            self._drop_when_free(pod)

    def pod(self, name):
        return next((p for pods in self.pods_by_job.values() for p in pods if p["metadata"]["name"] == name), None)

    def create_job(self, job, timeout=30):
        self.create_timeouts.append(timeout)
        if self.refuse:
            raise self.refuse
        key = (job["metadata"]["namespace"], job["metadata"]["name"])
        if key in self.jobs_by_name:
            return None
        job = copy.deepcopy(job)
        job["metadata"]["creationTimestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.jobs_by_name[key] = job
        self.created.append(job["metadata"]["name"])
        return job

    def delete_job(self, namespace, name):
        """Background propagation: the garbage collector deletes the Job's pods (here at once)."""
        self.jobs_by_name.pop((namespace, name), None)
        self.deleted.append(name)
        for pod in list(self.pods_by_job.get(name, [])):
            self.delete_pod(pod)

    def delete_resource(self, name, namespace="team"):
        """kubectl delete: the resource goes, the garbage collector deletes its Jobs and their pods."""
        del self.store[(namespace, name)]
        for job in list(self._labelled(namespace, name)):
            self.delete_job(namespace, job["metadata"]["name"])

    def finish(self, job_name, summary: dict, namespace="team"):
        job = self.jobs_by_name[(namespace, job_name)]
        job["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "completionTime": "2026-01-01T00:01:00Z"}
        self.end_pod(self.make_pod(job_name, namespace), 0, json.dumps(summary))


@pytest.fixture
def api(monkeypatch):
    fake = InMemoryApi()
    events: list[tuple[str, str, str]] = []
    monkeypatch.setattr(handlers, "_event", lambda resource, phase, reason, message: events.append((phase, reason, message)))
    monkeypatch.setitem(handlers._state, "cluster", fake)
    monkeypatch.setitem(handlers._state, "settings", Settings(worker_image="w:1", max_running=2))
    monkeypatch.setitem(handlers._state, "namespaces", None)
    monkeypatch.setitem(handlers._state, "policy", PolicySource(lambda: fake.configmap("mlopt-system", "mlopt-policy"),
                                                                clock=itertools.count(step=60).__next__))  # never cached
    fake.events = events
    return fake


def run(api, name, namespace="team"):
    handlers.run_generation(body=api.get_resource(namespace, name), logger=LOG)


def status(api, name, namespace="team"):
    return api.store[(namespace, name)].get("status", {})


def test_a_new_resource_gets_one_job_and_pending_status_with_an_event(api):
    from mlopt_operator.metrics import JOBS_CREATED

    created_before = JOBS_CREATED._value.get()
    api.add("digits")
    run(api, "digits")
    assert api.created == ["digits-g1"] and JOBS_CREATED._value.get() == created_before + 1
    assert (status(api, "digits")["phase"], status(api, "digits")["jobName"]) == ("Pending", "digits-g1")
    assert api.events[-1][:2] == ("Pending", "JobCreated")
    run(api, "digits")  # resumed (an operator restart): adopted, never a second Job
    assert api.created == ["digits-g1"]


def test_a_finished_generation_never_runs_twice_and_a_new_one_supersedes_the_old_job(api):
    api.add("digits")
    run(api, "digits")
    api.finish("digits-g1", {"v": 1, "phase": "Succeeded", "message": "done", "best": None})
    handlers._sync("team", "digits", "1")
    assert status(api, "digits")["phase"] == "Succeeded"
    run(api, "digits")
    assert api.created == ["digits-g1"]
    api.add("digits", generation=2)
    api.store[("team", "digits")]["status"] = {"phase": "Succeeded", "observedGeneration": 1, "jobName": "digits-g1",
                                                   "bestSize": "1 MB", "output": "s3://b/run/",
                                                   "artifacts": {"best": "s3://b/run/models/best.onnx"}}
    run(api, "digits")
    assert api.deleted == ["digits-g1"] and api.created == ["digits-g1", "digits-g2"]
    # generation 1's model and location must not read as generation 2's (it may fail, or keep nothing)
    assert not {"bestSize", "output", "artifacts"} & set(status(api, "digits"))
    assert status(api, "digits")["observedGeneration"] == 2


def test_an_invalid_spec_fails_for_good_naming_the_field(api):
    api.add("bad", benchmark={"runs": 1_000_000_000})
    with pytest.raises(kopf.PermanentError):
        run(api, "bad")
    assert (status(api, "bad")["phase"], status(api, "bad")["reason"]) == ("Failed", "InvalidSpec")
    assert "spec.benchmark.runs" in status(api, "bad")["message"] and api.created == []


def test_a_path_out_of_its_claim_fails_as_an_invalid_spec_and_mounts_nothing(api):
    """pvc://claim//etc/x would read the worker's own /etc/x: refused as `mlopt validate` refuses it."""
    api.add("escape", model={"source": "pvc://models//etc/x.onnx", "inputs": [{"name": "x", "shape": [1]}]})
    with pytest.raises(kopf.PermanentError):
        run(api, "escape")
    assert (status(api, "escape")["phase"], status(api, "escape")["reason"]) == ("Failed", "InvalidSpec")
    assert "spec.model.source: the path inside the claim begins with '/'" in status(api, "escape")["message"]
    assert api.created == []


def test_a_refused_job_fails_and_a_forbidden_one_waits_with_the_reason(api):
    api.add("refused")
    api.refuse = JobRefused(422, 'Job.batch "x" is invalid: spec.template...')
    with pytest.raises(kopf.PermanentError):
        run(api, "refused")
    assert (status(api, "refused")["phase"], status(api, "refused")["reason"]) == ("Failed", "JobRejected")
    api.add("quota")
    api.refuse = JobRefused(403, "exceeded quota: compute-resources")
    with pytest.raises(kopf.TemporaryError):
        run(api, "quota")
    assert (status(api, "quota")["phase"], status(api, "quota")["reason"]) == ("Pending", "JobForbidden")
    assert "exceeded quota" in status(api, "quota")["message"]


def test_over_the_cap_the_resource_is_queued_with_its_position_until_a_slot_frees(api):
    for index in range(4):
        api.add(f"r{index}", created=f"2026-01-01T00:00:0{index}Z")
    for index in range(4):
        try:
            run(api, f"r{index}")
        except kopf.TemporaryError:
            pass
    assert api.created == ["r0-g1", "r1-g1"]  # the cap is 2
    assert [status(api, f"r{i}").get("queuePosition") for i in (2, 3)] == [1, 2]
    assert (status(api, "r3")["phase"], status(api, "r3")["reason"]) == ("Queued", "OverCap")
    with pytest.raises(kopf.TemporaryError):
        run(api, "r3")  # r2 is first in line: r3 may not take a slot before it even if one frees
    api.finish("r0-g1", {"v": 1, "phase": "Succeeded", "message": "done"})
    with pytest.raises(kopf.TemporaryError):
        run(api, "r3")
    run(api, "r2")
    assert api.created[-1] == "r2-g1" and status(api, "r2")["phase"] == "Pending"
    assert "queuePosition" not in status(api, "r2")


def test_a_leader_whose_lease_may_have_lapsed_creates_no_job_and_asks_again(api, monkeypatch):
    """#29's cap breach around an API server restart: a leader cut off from the API server exits only
    when its renewal loop notices, while a standby may take the lease DURATION after it last saw it
    renewed. A Job created in between would be counted by neither replica's admission: it is
    created only while no standby can take over, and its create may not outlive that."""
    from mlopt_operator import leader

    clock = [1000.0]
    monkeypatch.setattr(leader.time, "monotonic", lambda: clock[0])
    lease = leader.Lease(lambda *args, **kwargs: {"spec": {"holderIdentity": "me"}, "metadata": {}}, "ns", "l", "me")
    monkeypatch.setattr(leader, "_held", lease)
    assert lease.try_acquire() and lease.safe_for() == leader.DURATION
    api.add("cut-off")
    clock[0] += leader.DURATION - handlers.FENCE_SECONDS + 0.5  # renewals failed since (the API server was away)
    with pytest.raises(kopf.TemporaryError, match="a standby may soon take over"):
        run(api, "cut-off")
    assert api.created == [] and status(api, "cut-off").get("phase") != "Pending"
    clock[0] = 1000.0  # renewed again
    assert lease.try_acquire()
    clock[0] += 2
    run(api, "cut-off")
    assert api.created == ["cut-off-g1"] and api.create_timeouts[-1] == pytest.approx(leader.DURATION - 2 - 1)


def test_sync_maps_the_job_and_deletes_one_that_can_never_start(api):
    api.add("img")
    run(api, "img")
    api.pods_by_job["img-g1"] = [{"metadata": {"name": "p", "creationTimestamp": "x"}, "status": {
        "phase": "Pending", "containerStatuses": [{"name": "worker", "state": {"waiting": {"reason": "ErrImageNeverPull"}}}]}}]
    handlers._sync("team", "img", "1")
    assert (status(api, "img")["phase"], status(api, "img")["reason"]) == ("Failed", "ErrImageNeverPull")
    assert api.deleted == ["img-g1"]


def test_sync_reports_failed_create_then_fails_after_the_wait(api, monkeypatch):
    api.add("sa")
    run(api, "sa")
    api.events_by_job["sa-g1"] = [{"reason": "FailedCreate", "message": 'serviceaccount "nope" not found'}]
    handlers._sync("team", "sa", "1")
    assert (status(api, "sa")["phase"], status(api, "sa")["reason"]) == ("Pending", "FailedCreate")
    assert api.events[-1][:2] == ("Pending", "FailedCreate")  # a new reason gets its own Event
    monkeypatch.setitem(handlers._state, "settings", Settings(worker_image="w:1", waits=Waits(failed_create=0)))
    handlers._sync("team", "sa", "1")
    assert (status(api, "sa")["phase"], status(api, "sa")["reason"]) == ("Failed", "FailedCreate")
    assert api.deleted == ["sa-g1"]


def test_sync_ignores_other_generations_foreign_jobs_and_final_statuses(api):
    api.add("digits")
    run(api, "digits")
    api.jobs_by_name[("team", "digits-g1")]["metadata"]["ownerReferences"] = [{"uid": "someone-else"}]
    handlers._sync("team", "digits", "1")
    assert status(api, "digits")["reason"] == "JobCreated"  # a Job of a deleted namesake: left to the GC
    handlers._sync("team", "digits", "7")  # not the resource's generation
    handlers._sync("team", "gone", "1")  # no such resource
    assert status(api, "digits")["reason"] == "JobCreated"


def test_job_and_pod_events_find_the_resource_by_its_annotation(api, monkeypatch):
    seen = []
    monkeypatch.setattr(handlers, "_sync", lambda namespace, name, generation, pod=None: seen.append((namespace, name, generation)))
    meta = {"namespace": "team", "labels": {"mlopt.io/name": "short-abc123", "mlopt.io/generation": "3"},
            "annotations": {"mlopt.io/resource": "the-full-name"}}
    handlers.job_changed(meta=meta, type="MODIFIED")
    handlers.pod_changed(body={"metadata": {"name": "p"}}, meta={**meta, "annotations": {}}, type="ADDED")
    handlers.pod_changed(body={"metadata": {"name": "p"}}, meta=meta, type="DELETED")
    assert seen == [("team", "the-full-name", "3"), ("team", "short-abc123", "3")]


def test_a_resource_outside_the_policy_fails_naming_the_rule_and_creates_no_job(api):
    api.add("own-image", job={"image": "evil.example.com/miner:latest"})
    with pytest.raises(kopf.PermanentError):
        run(api, "own-image")
    got = status(api, "own-image")
    assert got["phase"] == "Failed" and got["reason"] == "PolicyViolation", got
    assert "allowedImages" in got["message"] and "evil.example.com/miner:latest" in got["message"]
    assert "mlopt-system/mlopt-policy" in got["message"]
    assert api.created == [] and api.events[-1][:2] == ("Failed", "PolicyViolation")


def test_a_policy_change_applies_to_the_next_resource_and_a_broken_policy_holds_jobs(api):
    api.policy_text = "allowedImages: [evil.example.com/*]"
    api.add("own-image", job={"image": "evil.example.com/miner:latest"})
    run(api, "own-image")
    assert api.created == ["own-image-g1"]

    api.policy_text = "allowedImages: evil"  # not a list
    api.add("held")
    with pytest.raises(kopf.TemporaryError):
        run(api, "held")
    got = status(api, "held")
    assert got["phase"] == "Pending" and got["reason"] == "PolicyUnreadable" and "allowedImages" in got["message"]
    assert api.created == ["own-image-g1"]


def test_startup_filters_job_and_pod_watches_on_the_server_and_reads_the_policy(api, monkeypatch):
    from kopf._cogs.structs.references import Resource

    from mlopt_operator import metrics

    api.crd_established = lambda: True
    api.policy_text = "maxMemory: 1Gi"
    monkeypatch.setattr(handlers, "Cluster", lambda: api)
    monkeypatch.setattr(metrics, "lead", lambda resources: None)
    monkeypatch.setitem(handlers._state, "metrics_leading", False)
    settings = kopf.OperatorSettings()
    handlers.configure(settings=settings, logger=LOG)

    def selectors(group, plural):
        return list(settings.watching.label_selectors.collect(Resource(group=group, version="v1", plural=plural)))

    assert selectors("batch", "jobs") == selectors("", "pods") == ["app.kubernetes.io/managed-by=mlopt-operator"]
    assert selectors("mlopt.io", "modeloptimizations") == []  # every resource is the operator's business
    assert handlers._state["policy"].current().maxMemory == "1Gi"


def test_a_running_job_is_adopted_even_when_the_policy_changed_since_it_started(api):
    api.policy_text = "allowedImages: [evil.example.com/*]"
    api.add("own-image", job={"image": "evil.example.com/miner:latest"})
    run(api, "own-image")
    assert api.created == ["own-image-g1"]
    api.policy_text = ""  # tightened back to the defaults while the Job runs
    run(api, "own-image")  # resumed (an operator restart): the running Job is adopted, not refused
    assert status(api, "own-image")["phase"] == "Pending" and api.created == ["own-image-g1"]


# --------------------------------------------------------------------------------------------------
# Nothing lost: a worker's summary outlives its pod until status has it (operator/finalizer.py)

SUMMARY = json.dumps({"v": 1, "phase": "Succeeded", "message": "best onnx-fp32: 1.50x faster", "best": "onnx-fp32",
                      "baseline": {"name": "pytorch-fp32", "recipe": "pytorch", "status": "ok", "speedup": 1.0},
                      "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32", "status": "ok", "speedup": 1.5}]})


def has_results(got):
    return got.get("phase") == "Succeeded" and got.get("baseline") and got.get("variants") and got.get("exitCode") == 0


def pod_event(api, pod, kind="MODIFIED"):
    """The pod's watch event as kopf delivers it (kind None: the listing when the operator starts)."""
    handlers.pod_changed(body=copy.deepcopy(pod), meta=copy.deepcopy(pod["metadata"]), type=kind)


def job_event(api, job_name, kind="MODIFIED", namespace="team"):
    job = copy.deepcopy(api.jobs_by_name[(namespace, job_name)])
    handlers.job_changed(meta=job["metadata"], type=kind)


def started(api, name):
    api.add(name)
    run(api, name)
    pod = api.make_pod(f"{name}-g1")
    pod_event(api, pod, "ADDED")
    assert status(api, name)["phase"] == "Running"
    return pod


def test_a_worker_deleted_right_after_it_exits_0_still_gets_its_results_into_status(api):
    """The chaos test's load-087: the worker exits 0, the Job counts it, and an eviction deletes the
    finished pod before the operator has read its termination message."""
    pod = started(api, "evicted-after")
    api.end_pod(pod, 0, SUMMARY)
    api.job_condition("evicted-after-g1", "SuccessCriteriaMet")
    api.delete_pod(pod)  # the eviction, before any handler ran
    assert api.pod(pod["metadata"]["name"]) is not None, "the deleted pod must stay until its summary is read"
    pod_event(api, api.pod(pod["metadata"]["name"]))
    assert has_results(status(api, "evicted-after")), status(api, "evicted-after")
    assert api.pod(pod["metadata"]["name"]) is None and api.released == [pod["metadata"]["name"]]


def test_an_operator_restarting_after_the_finished_pod_was_deleted_still_records_its_results(api):
    """The operator is down while the worker exits 0, the Job completes and the pod is deleted; when it
    starts again kopf resumes the resource and lists the Jobs and pods."""
    pod = started(api, "restarted")
    api.end_pod(pod, 0, SUMMARY)
    api.job_condition("restarted-g1", "SuccessCriteriaMet")
    api.job_condition("restarted-g1", "Complete")
    api.delete_pod(pod)
    run(api, "restarted")  # @kopf.on.resume: the Job is adopted, never made again
    job_event(api, "restarted-g1", kind=None)
    assert has_results(status(api, "restarted")), status(api, "restarted")
    assert api.created == ["restarted-g1"] and api.pod(pod["metadata"]["name"]) is None


def test_a_completed_job_is_never_recorded_without_the_summary_of_its_exit_0_pod(api):
    """Completion, the read and the deletion in every order: whichever event comes first, status ends
    with the results, and the pod goes only after that."""
    orders = {"job event, then pod event": ("job", "pod"), "pod event, then job event": ("pod", "job")}
    for index, (label, order) in enumerate(orders.items()):
        name = f"order-{index}"
        pod = started(api, name)
        api.end_pod(pod, 0, SUMMARY)
        api.delete_pod(pod)
        pod_event(api, api.pod(pod["metadata"]["name"]))  # the Job has not decided yet: the pod is kept
        assert status(api, name)["phase"] == "Running" and api.pod(pod["metadata"]["name"]) is not None, label
        api.job_condition(f"{name}-g1", "SuccessCriteriaMet")
        for event in order:
            if event == "job":
                job_event(api, f"{name}-g1")
            elif api.pod(pod["metadata"]["name"]):
                pod_event(api, api.pod(pod["metadata"]["name"]))
        assert has_results(status(api, name)), (label, status(api, name))
        assert api.pod(pod["metadata"]["name"]) is None, label


def completed_while_failing(api, monkeypatch, name, call, error):
    """The worker exits 0 and the Job meets its success criteria; handling that Job event fails in the
    API call `call`, which raises `error`. Returns the pod."""
    pod = started(api, name)
    api.end_pod(pod, 0, SUMMARY)
    api.job_condition(f"{name}-g1", "SuccessCriteriaMet")

    def fails(*args):
        raise error

    with monkeypatch.context() as patched:
        patched.setattr(api, call, fails)
        with pytest.raises(type(error)):
            job_event(api, f"{name}-g1")
    return pod


def test_a_pod_whose_outcome_was_recorded_just_before_the_operator_stopped_is_released_after_it(api, monkeypatch):
    # status written, then the operator died before the release
    pod = completed_while_failing(api, monkeypatch, "half-done", "release_pod", ConnectionResetError("SIGKILL"))
    assert has_results(status(api, "half-done"))
    api.delete_pod(api.pod(pod["metadata"]["name"]))  # e.g. evicted while no operator runs
    pod_event(api, api.pod(pod["metadata"]["name"]), kind=None)  # the restarted operator lists the pods
    assert api.pod(pod["metadata"]["name"]) is None and has_results(status(api, "half-done"))


def test_a_failed_worker_deleted_before_its_summary_is_read_still_explains_the_failure(api):
    pod = started(api, "broken")
    api.end_pod(pod, 1, json.dumps({"v": 1, "phase": "Failed", "reason": "ModelLoadFailed",
                                    "message": "model.source: not an ONNX model"}))
    api.delete_pod(pod)
    api.job_condition("broken-g1", "FailureTarget")
    job_event(api, "broken-g1")
    got = status(api, "broken")
    assert (got["phase"], got["reason"]) == ("Failed", "ModelLoadFailed") and "model.source" in got["message"], got
    assert api.pod(pod["metadata"]["name"]) is None


def test_an_evicted_running_worker_is_released_at_once_and_its_replacement_reports(api):
    first = started(api, "drained")
    api.delete_pod(first)  # evicted while running: SIGTERM is on its way
    pod_event(api, api.pod(first["metadata"]["name"]))
    assert api.pod(first["metadata"]["name"]) is not None  # still running: it may yet exit 0
    api.end_pod(first, 143, "Traceback ... SystemExit: 143")
    pod_event(api, api.pod(first["metadata"]["name"]))
    assert api.pod(first["metadata"]["name"]) is None  # a drain is not held up by an attempt the Job replaces
    assert status(api, "drained")["phase"] == "Running"
    second = api.make_pod("drained-g1")  # the Job's replacement
    api.end_pod(second, 0, SUMMARY)
    api.job_condition("drained-g1", "SuccessCriteriaMet")
    job_event(api, "drained-g1")
    assert has_results(status(api, "drained"))
    assert api.released == [first["metadata"]["name"], second["metadata"]["name"]]
    assert api.pod(second["metadata"]["name"])["metadata"]["finalizers"] == []  # a later delete is immediate


def test_deleting_the_resource_or_superseding_its_generation_releases_the_pods(api):
    running = started(api, "gone")
    api.delete_resource("gone")
    pod_event(api, api.pod(running["metadata"]["name"]))
    assert api.pod(running["metadata"]["name"]) is None

    old = started(api, "edited")
    api.end_pod(old, 0, SUMMARY)  # finished, but generation 2 arrives before its summary is read
    api.add("edited", generation=2)
    run(api, "edited")  # supersedes generation 1: its Job is deleted, the garbage collector deletes the pod
    assert api.pod(old["metadata"]["name"])["metadata"].get("deletionTimestamp")
    pod_event(api, api.pod(old["metadata"]["name"]))
    assert api.pod(old["metadata"]["name"]) is None
    assert api.created[-1] == "edited-g2" and status(api, "edited")["observedGeneration"] == 2


def test_a_pod_of_a_deleted_namesake_is_released_even_when_a_new_resource_has_its_name(api):
    old = started(api, "reused")
    api.end_pod(old, 0, SUMMARY)
    api.delete_resource("reused")
    api.add("reused")  # the same name again, a new uid; its Job will have the old one's name
    api.store[("team", "reused")]["metadata"]["uid"] = "uid-reused-2"
    pod_event(api, api.pod(old["metadata"]["name"]))
    assert api.pod(old["metadata"]["name"]) is None


def test_a_completion_whose_handling_failed_is_recorded_by_the_next_recheck(api, monkeypatch):
    """kopf never delivers a watch event again whose handler raised (the API server away just then):
    a Running resource is looked at again by the timer, so its results are not left unread."""
    pod = completed_while_failing(api, monkeypatch, "missed", "patch_status",
                                  ConnectionRefusedError("the API server restarts"))
    assert status(api, "missed")["phase"] == "Running" and api.pod(pod["metadata"]["name"])["metadata"]["finalizers"]
    assert handlers._running(status=status(api, "missed"))  # the timer's filter
    handlers.recheck_running(meta=api.get_resource("team", "missed")["metadata"])
    assert has_results(status(api, "missed"))


def test_a_job_past_success_criteria_but_not_complete_still_holds_its_slot(api):
    """SuccessCriteriaMet comes before Complete (and completionTime); until then Kubernetes counts the
    Job as active, and so does the cap."""
    for index in range(3):
        api.add(f"s{index}", created=f"2026-01-01T00:00:0{index}Z")
    run(api, "s0")
    run(api, "s1")
    api.job_condition("s0-g1", "SuccessCriteriaMet")
    with pytest.raises(kopf.TemporaryError):
        run(api, "s2")  # the cap is 2
    api.job_condition("s0-g1", "Complete")
    run(api, "s2")
    assert api.created == ["s0-g1", "s1-g1", "s2-g1"]


# --------------------------------------------------------------------------------------------------
# spec.targets: one Job per target, rows in status, a recommendation

def served_summary(variant, rps, p99):
    return {"v": 1, "phase": "Succeeded", "message": f"best {variant}", "best": variant, "target": "t",
            "baseline": {"name": "pytorch-fp32", "recipe": "pytorch", "status": "ok", "speedup": 1.0},
            "variants": [{"name": variant, "recipe": variant, "status": "ok", "speedup": 2.0}],
            "serving": {"variant": variant, "requestsPerSecond": rps, "p99Ms": p99, "latencySLOMs": 50.0}}


THREE = [{"name": "big", "resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
          "pricePerHour": 0.2},
         {"name": "small", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
          "pricePerHour": 0.1},
         {"name": "nowhere", "nodeSelector": {"mlopt.io/pool": "does-not-exist"}}]


def unschedulable_pod(api, job_name):
    pod = api.make_pod(job_name)
    pod["metadata"]["creationTimestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    pod["status"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."}]}
    return pod


def rows(api, name):
    return {row["name"]: row for row in status(api, name).get("targets", [])}


def test_targets_take_one_slot_each_fail_unschedulable_alone_and_end_with_a_recommendation(api, monkeypatch):
    from mlopt_operator.metrics import JOBS_CREATED

    created_before = JOBS_CREATED._value.get()
    api.add("pools", targets=THREE, demand=100)
    api.add("later", created="2026-01-01T00:00:05Z")
    with pytest.raises(kopf.TemporaryError, match="1 target"):
        run(api, "pools")  # the cap is 2 Jobs: two targets start, the third waits for a slot
    assert api.created == ["pools-g1-big", "pools-g1-small"] and JOBS_CREATED._value.get() == created_before + 2
    assert {n: r["phase"] for n, r in rows(api, "pools").items()} == {"big": "Pending", "small": "Pending",
                                                                       "nowhere": "Queued"}
    with pytest.raises(kopf.TemporaryError):
        run(api, "later")  # both slots are taken by pools' Jobs
    assert status(api, "later")["phase"] == "Queued"

    big, small = api.make_pod("pools-g1-big"), api.make_pod("pools-g1-small")
    pod_event(api, big, "ADDED")
    assert status(api, "pools")["phase"] == "Running"
    api.finish("pools-g1-big", served_summary("onnx-fp32", 40.0, 20.0))  # a second pod: the one that exited 0
    done = api.pods_by_job["pools-g1-big"][-1]
    pod_event(api, done)
    assert rows(api, "pools")["big"]["phase"] == "Succeeded" and status(api, "pools")["phase"] == "Running"
    assert done["metadata"]["name"] in api.released  # its row is final: released while the others run
    assert small["metadata"]["name"] not in api.released

    run(api, "pools")  # big's Job ended: its slot goes to pools' third target, first in line
    assert api.created[-1] == "pools-g1-nowhere"
    stuck = unschedulable_pod(api, "pools-g1-nowhere")
    pod_event(api, stuck, "ADDED")
    assert rows(api, "pools")["nowhere"]["reason"] == "Unschedulable"
    assert rows(api, "pools")["nowhere"]["phase"] == "Pending"  # within the operator's wait
    monkeypatch.setitem(handlers._state, "settings", Settings(worker_image="w:1", max_running=2,
                                                              waits=Waits(unschedulable=0)))
    handlers.recheck_running(meta=api.get_resource("team", "pools")["metadata"])
    nowhere = rows(api, "pools")["nowhere"]
    assert (nowhere["phase"], nowhere["reason"]) == ("Failed", "Unschedulable")
    assert "didn't match Pod's node affinity/selector" in nowhere["message"]
    assert "pools-g1-nowhere" in api.deleted and status(api, "pools")["phase"] == "Running"  # small goes on
    run(api, "pools")
    assert api.created.count("pools-g1-nowhere") == 1  # a failed target is never started again

    api.finish("pools-g1-small", served_summary("ort-int8-static", 60.0, 30.0))
    job_event(api, "pools-g1-small")
    got = status(api, "pools")
    # big: 3 pods x 0.2 = 0.6/h; small: 2 pods x 0.1 = 0.2/h for 100 requests/s
    assert got["phase"] == "Succeeded" and got["recommended"] == "small/ort-int8-static", got
    assert (got["best"], got["bestSpeedup"]) == ("ort-int8-static", "2.00x")
    assert [r["phase"] for r in got["targets"]] == ["Succeeded", "Succeeded", "Failed"]
    assert got["targets"][1]["replicas"] == 2 and got["targets"][1]["costPerHour"] == pytest.approx(0.2)
    assert "failed: nowhere (Unschedulable)" in got["message"] and "jobName" not in got
    assert all(not p["metadata"]["finalizers"] for pods in api.pods_by_job.values() for p in pods)  # none held
    assert JOBS_CREATED._value.get() == created_before + 3
    run(api, "later")
    assert api.created[-1] == "later-g1"


def test_a_new_generation_of_a_targets_resource_starts_from_clean_rows(api):
    api.add("pools", targets=THREE[:2])
    run(api, "pools")
    for job in ("pools-g1-big", "pools-g1-small"):
        api.finish(job, served_summary("onnx-fp32", 40.0, 20.0))
        job_event(api, job)
    assert status(api, "pools")["phase"] == "Succeeded" and status(api, "pools")["recommended"]
    before = copy.deepcopy(status(api, "pools"))
    api.add("pools", generation=2, targets=THREE[:1])
    api.store[("team", "pools")]["status"] = before  # generation 1's rows and recommendation
    run(api, "pools")
    got = status(api, "pools")
    assert api.created[-1] == "pools-g2-big" and {"pools-g1-big", "pools-g1-small"} <= set(api.deleted)
    assert [r["name"] for r in got["targets"]] == ["big"] and got["targets"][0]["phase"] == "Pending"
    assert not {"recommended", "recommendation", "best"} & set(got) and got["observedGeneration"] == 2


def test_under_kueue_every_targets_job_is_made_at_once_suspended_and_the_cap_counts_none(api):
    api.add("queued-pools", targets=THREE, job={"queueName": "team-queue"})
    run(api, "queued-pools")  # the operator's cap (2) does not apply: Kueue admits each Job
    assert api.created == ["queued-pools-g1-big", "queued-pools-g1-small", "queued-pools-g1-nowhere"]
    assert all(api.jobs_by_name[("team", name)]["spec"]["suspend"] for name in api.created)
    assert {r["phase"] for r in rows(api, "queued-pools").values()} == {"Queued"}  # WaitingForKueue, each
    assert {r["reason"] for r in rows(api, "queued-pools").values()} == {"WaitingForKueue"}
