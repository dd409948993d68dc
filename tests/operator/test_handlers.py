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
        self.deleted: list[str] = []
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

    def priority(self, class_name):
        return 0

    def pods(self, namespace, job_name):
        return self.pods_by_job.get(job_name, [])

    def create_job(self, job):
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
        self.jobs_by_name.pop((namespace, name), None)
        self.deleted.append(name)

    def finish(self, job_name, summary: dict, namespace="team"):
        job = self.jobs_by_name[(namespace, job_name)]
        job["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "completionTime": "2026-01-01T00:01:00Z"}
        self.pods_by_job[job_name] = [{"metadata": {"name": f"{job_name}-p", "creationTimestamp": "x"},
                                       "status": {"phase": "Succeeded", "containerStatuses": [{"name": "worker", "state": {
                                           "terminated": {"exitCode": 0, "message": json.dumps(summary)}}}]}}]


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
    monkeypatch.setattr(handlers, "_sync", lambda namespace, name, generation: seen.append((namespace, name, generation)))
    meta = {"namespace": "team", "labels": {"mlopt.io/name": "short-abc123", "mlopt.io/generation": "3"},
            "annotations": {"mlopt.io/resource": "the-full-name"}}
    handlers.job_changed(meta=meta, type="MODIFIED")
    handlers.pod_changed(meta={**meta, "annotations": {}}, type="ADDED")
    handlers.pod_changed(meta=meta, type="DELETED")
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
