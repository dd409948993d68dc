"""The cluster (control plane + the real node: kubelet, containerd, runc) behaves like a cluster for
what the operator needs: CRDs, Jobs that really run from an image, termination messages, failures,
deadlines, garbage collection, namespace deletion, configuration from ConfigMaps/Secrets and
in-cluster credentials through the `kubernetes` Service. Everything goes through kubectl."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .control_plane import BASE_IMAGE

pytestmark = pytest.mark.e2e

TIMEOUT = 180  # generous: two slow cores run etcd, the API server, the controllers and the test


def apply(cp, tmp_path: Path, *objects: dict) -> None:
    manifest = tmp_path / f"manifest-{time.monotonic_ns()}.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    cp.kubectl("apply", "-f", str(manifest))


def job(name: str, namespace: str, command: list[str], env: list[dict] | None = None, **spec) -> dict:
    # The base image (Debian + Python) is imported into the node, never pulled.
    container = {"name": "main", "image": BASE_IMAGE, "imagePullPolicy": "Never", "command": command,
                 "env": env or []}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
            **spec,
        },
    }


def wait_for(what: str, check, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def job_finished(cp, namespace: str, name: str) -> dict | None:
    """The Job's Complete or Failed condition once it is True."""
    status = cp.kubectl_json("get", "job", name, "-n", namespace).get("status", {})
    for cond in status.get("conditions", []):
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return cond
    return None


def job_pods(cp, namespace: str, name: str) -> list[dict]:
    return cp.kubectl_json("get", "pods", "-n", namespace, "-l", f"job-name={name}")["items"]


def terminated(pod: dict) -> dict:
    (status,) = pod["status"]["containerStatuses"]
    return status["state"]["terminated"]


def test_crd_and_job_run_to_completion_then_are_garbage_collected(control_plane, namespace, tmp_path):
    cp = control_plane
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.e2e.mlopt.dev"},
        "spec": {
            "group": "e2e.mlopt.dev",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {"type": "object", "properties": {"size": {"type": "integer"}}}},
            }}}],
        },
    }
    apply(cp, tmp_path, crd)
    cp.kubectl("wait", "--for=condition=Established", "crd/widgets.e2e.mlopt.dev", f"--timeout={TIMEOUT}s")
    widget = {"apiVersion": "e2e.mlopt.dev/v1", "kind": "Widget",
              "metadata": {"name": "w1", "namespace": namespace}, "spec": {"size": 3}}
    pod_name_env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    apply(cp, tmp_path, widget, job("hello", namespace,
                                    ["sh", "-c", "echo hello from $(POD_NAME) > /dev/termination-log"],
                                    pod_name_env))
    assert cp.kubectl_json("get", "widget", "w1", "-n", namespace)["spec"] == {"size": 3}

    condition = wait_for("job hello to finish", lambda: job_finished(cp, namespace, "hello"))
    assert condition["type"] == "Complete", condition
    (pod,) = job_pods(cp, namespace, "hello")
    assert pod["status"]["phase"] == "Succeeded"
    state = terminated(pod)
    assert state["exitCode"] == 0 and state["reason"] == "Completed"
    assert state["message"] == f"hello from {pod['metadata']['name']}\n"
    assert pod["spec"]["nodeName"] == cp.node_name  # placed by kube-scheduler
    assert pod["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")

    cp.kubectl("delete", "job", "hello", "-n", namespace, "--cascade=background")
    wait_for("the job's pods to be garbage-collected", lambda: not job_pods(cp, namespace, "hello"))


def test_failing_container_fails_the_job_with_its_exit_code(control_plane, namespace, tmp_path):
    cp = control_plane
    apply(cp, tmp_path, job("fails", namespace, ["sh", "-c", "echo about to fail; exit 3"]))
    condition = wait_for("job fails to finish", lambda: job_finished(cp, namespace, "fails"))
    assert condition["type"] == "Failed" and condition["reason"] == "BackoffLimitExceeded", condition
    (pod,) = job_pods(cp, namespace, "fails")
    assert pod["status"]["phase"] == "Failed"
    assert terminated(pod)["exitCode"] == 3 and terminated(pod)["reason"] == "Error"
    assert cp.container_log(namespace, pod["metadata"]["name"], "main") == "about to fail\n"


def test_fallback_to_logs_on_error_puts_the_log_tail_in_the_message(control_plane, namespace, tmp_path):
    cp = control_plane
    manifest = job("fallback", namespace, ["sh", "-c", "echo first; echo 'Traceback: boom' >&2; exit 1"])
    manifest["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    apply(cp, tmp_path, manifest)
    wait_for("job fallback to finish", lambda: job_finished(cp, namespace, "fallback"))
    (pod,) = job_pods(cp, namespace, "fallback")
    # Both streams reach the message; their order is not kept (stdout and stderr are separate pipes
    # that the shim copies concurrently, exactly as on any containerd node).
    assert sorted(terminated(pod)["message"].splitlines()) == ["Traceback: boom", "first"]


def running_container_id(cp, namespace: str, job_name: str) -> str | None:
    for pod in job_pods(cp, namespace, job_name):
        for status in pod["status"].get("containerStatuses", []):
            if "running" in status.get("state", {}):
                return status["containerID"].removeprefix("containerd://")
    return None


def test_active_deadline_kills_the_process(control_plane, namespace, tmp_path):
    cp = control_plane
    apply(cp, tmp_path, job("deadline", namespace, ["sleep", "300"], activeDeadlineSeconds=8))
    container = wait_for("the container to run", lambda: running_container_id(cp, namespace, "deadline"))
    assert container in cp.node.ctr("tasks", "ls", "-q").stdout.split()
    condition = wait_for("job deadline to finish", lambda: job_finished(cp, namespace, "deadline"))
    assert condition["type"] == "Failed" and condition["reason"] == "DeadlineExceeded", condition
    wait_for("containerd's task (sleep 300) to be killed",
             lambda: container not in cp.node.ctr("tasks", "ls", "-q").stdout.split())
    wait_for("the deleted pod to be removed", lambda: not job_pods(cp, namespace, "deadline"))


def test_namespace_deletion_completes(control_plane, tmp_path):
    cp = control_plane
    name = cp.create_namespace("doomed")
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": name},
                 "data": {"a": "1"}}
    apply(cp, tmp_path, configmap, job("busy", name, ["sleep", "300"]))
    wait_for("the busy pod to run", lambda: any(p["status"].get("phase") == "Running" for p in job_pods(cp, name, "busy")))
    cp.kubectl("delete", "namespace", name, "--wait=false")
    wait_for(f"namespace {name} to disappear",
             lambda: cp.kubectl("get", "namespace", name, check=False).returncode != 0
             and "NotFound" in cp.kubectl("get", "namespace", name, check=False).stderr)


def test_env_and_volumes_from_configmap_and_secret_reach_the_process(control_plane, namespace, tmp_path):
    cp = control_plane
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": namespace},
                 "data": {"mode": "fast", "config.yaml": "threads: 2\n"}}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": namespace},
              "stringData": {"token": "t0ps3cret"}}
    script = (
        "import json, os, sys\n"
        "report = {'mode': os.environ['MODE'], 'token': os.environ['TOKEN'], 'from': os.environ['FROM_mode'],\n"
        "          'file': open('/etc/settings/config.yaml').read(),\n"
        "          'sa_namespace': open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read()}\n"
        "open('/dev/termination-log', 'w').write(json.dumps(report))\n"
    )
    env = [
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
    ]
    manifest = job("config", namespace, ["python", "-c", script], env)
    pod_spec = manifest["spec"]["template"]["spec"]
    pod_spec["containers"][0]["envFrom"] = [{"configMapRef": {"name": "settings"}, "prefix": "FROM_"}]
    pod_spec["containers"][0]["volumeMounts"] = [{"name": "settings", "mountPath": "/etc/settings", "readOnly": True}]
    pod_spec["volumes"] = [{"name": "settings", "configMap": {"name": "settings"}}]
    apply(cp, tmp_path, configmap, secret, manifest)

    condition = wait_for("job config to finish", lambda: job_finished(cp, namespace, "config"))
    (pod,) = job_pods(cp, namespace, "config")
    assert condition["type"] == "Complete", terminated(pod)
    report = json.loads(terminated(pod)["message"])
    assert report == {"mode": "fast", "token": "t0ps3cret", "from": "fast", "file": "threads: 2\n",
                      "sa_namespace": namespace}
    assert not Path("/etc/settings").exists()  # mounted in the container's namespace only


def test_in_cluster_credentials_work_from_a_container(control_plane, namespace, tmp_path):
    """The projected service-account token + KUBERNETES_SERVICE_* let a pod call the API server."""
    cp = control_plane
    script = (
        "import os, ssl, urllib.request\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount/'\n"
        "url = 'https://%s:%s/api' % (os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT'])\n"
        "req = urllib.request.Request(url, headers={'Authorization': 'Bearer ' + open(sa + 'token').read()})\n"
        "ctx = ssl.create_default_context(cafile=sa + 'ca.crt')\n"
        "open('/dev/termination-log', 'w').write(str(urllib.request.urlopen(req, context=ctx).status))\n"
    )
    manifest = job("incluster", namespace, ["python", "-c", script])
    manifest["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    apply(cp, tmp_path, manifest)
    wait_for("job incluster to finish", lambda: job_finished(cp, namespace, "incluster"))
    (pod,) = job_pods(cp, namespace, "incluster")
    assert terminated(pod)["message"] == "200", terminated(pod)


def test_kubectl_helper_reports_failures(control_plane):
    with pytest.raises(subprocess.CalledProcessError):
        control_plane.kubectl("get", "namespace", "does-not-exist")
    assert control_plane.kubectl("get", "namespace", "does-not-exist", check=False).returncode != 0


def test_the_node_keeps_one_build_of_each_image(control_plane):
    """A rebuilt image replaces the old one in containerd's store: CRI's by-ID refs of earlier builds
    are dropped at start, so a machine that rebuilds on every change does not fill its disk."""
    node = control_plane.node
    assert {"docker.io/mlopt/worker:0.1.0", "docker.io/mlopt/operator:0.1.0"} <= node.image_refs().keys()
    assert node.stale_image_refs() == []
    assert node.remove_stale_images() == []
