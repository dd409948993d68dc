"""The operator on the real cluster (tests/e2e/control_plane.py: kubelet, containerd, runc), with kubectl.

The operator runs exactly as a user installs it on kind: `kubectl apply -k manifests/overlays/kind`,
the Deployment from the operator image under its own service account with only the RBAC in
manifests/base; every Job pod runs the worker image. Both images come from the Dockerfile
(tools/build-images.sh). Most cases use the small digits model with one variant; only
examples/crnn.yaml runs the CRNN.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from mlopt_operator.job import kueue_workload_names
from mlopt_operator.policy import CACHE_SECONDS
from optimizer.artifacts.storage import PROBE_PREFIX

from .control_plane import BASE_IMAGE, WORKER_IMAGE, free_port
from .kueue import FLAVOR

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
OPERATOR_NS, OPERATOR_SA = "mlopt-system", "mlopt-operator"
CRD = REPO / "crds" / "modeloptimizations.mlopt.io.yaml"
DIGITS_RUNS = 5


# --------------------------------------------------------------------------------------------------
# The operator process


class OperatorProcess:
    """`mlopt operator` as a local process with a kubeconfig holding the service account's token
    (the CLI entry point; the cluster's operator is the Deployment below)."""

    def __init__(self, kubeconfig: Path, workdir: Path, command: list[str] | None = None):
        self.kubeconfig, self.workdir = kubeconfig, workdir
        self.command = command or [sys.executable, "-m", "mlopt_operator.main"]
        self.log = workdir / "operator.log"
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        self.port = free_port()
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "MLOPT_WORKER_IMAGE": WORKER_IMAGE}
        with open(self.log, "ab") as out:
            # cwd outside the repo, like an installed operator; own process group, killed by PID.
            self.process = subprocess.Popen(
                [*self.command, f"--liveness=http://127.0.0.1:{self.port}/healthz"],
                cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for("the operator's liveness endpoint", self._healthy, 60, self.tail)

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the operator exited ({self.process.returncode}):\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "".join(text.splitlines(keepends=True)[-lines:])


def wait_for(what: str, check, timeout: float, details=lambda: "", interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{details()}")


def token_kubeconfig(control_plane, path: Path) -> Path:
    """The admin kubeconfig's cluster with the operator service account's token as the user."""
    admin = yaml.safe_load(control_plane.kubeconfig.read_text())
    token = control_plane.kubectl("create", "token", OPERATOR_SA, "-n", OPERATOR_NS, "--duration=2h").stdout.strip()
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": OPERATOR_SA, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": admin["clusters"][0]["name"], "user": OPERATOR_SA}}],
        "current-context": "operator",
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


class OperatorDeployment:
    """The operator's Deployment (manifests/overlays/kind) as it runs on the node."""

    def __init__(self, cp, kubeconfig: Path):
        self.cp, self.kubeconfig = cp, kubeconfig  # kubeconfig: the operator SA's token, for `auth can-i`
        self.restarts = 0  # the container's restartCount when crash() killed it

    def holder(self) -> str | None:
        """The Lease's holderIdentity: `<pod>_<per-process id>`."""
        found = self.cp.kubectl("get", "lease", "mlopt-operator", "-n", OPERATOR_NS, "-o", "json", check=False)
        return (json.loads(found.stdout).get("spec") or {}).get("holderIdentity") if found.returncode == 0 else None

    def leader(self) -> str | None:
        """The pod whose process holds the Lease."""
        holder = self.holder()
        return holder.rsplit("_", 1)[0] if holder else None

    def pods(self) -> list[dict]:
        """The replicas, less pods on their way out (a rollout's old pod terminates for a while)."""
        found = self.cp.kubectl_json("get", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=mlopt-operator")
        return [p for p in found["items"] if not p["metadata"].get("deletionTimestamp")]

    def metrics(self, pod_name: str) -> str:
        """/metrics of one replica, through the API server's pod proxy (as `kubectl get --raw` reaches it anywhere)."""
        return self.cp.kubectl("get", "--raw", f"/api/v1/namespaces/{OPERATOR_NS}/pods/{pod_name}:9090/proxy/metrics").stdout

    def pod(self) -> dict:
        """The replica that holds the lease (the one acting), else the newest."""
        pods, leader = self.pods(), self.leader()
        holding = [p for p in pods if p["metadata"]["name"] == leader]
        return holding[0] if holding else max(pods, key=lambda p: p["metadata"]["creationTimestamp"])

    def wait_ready(self, timeout: float = 240) -> None:
        """The rollout is done and one of its pods leads. `rollout status` returns once the new replicas
        are Ready, but a standby is Ready too, and the old leader, terminating, still acts (with the old
        settings) until it releases the Lease: wait for the old pods to be gone and a new one to lead."""
        self.cp.kubectl("rollout", "status", "deployment/mlopt-operator", "-n", OPERATOR_NS, f"--timeout={timeout}s",
                        timeout=timeout + 30)

        def new_leader():
            listed = self.cp.kubectl_json("get", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=mlopt-operator")
            current = {p["metadata"]["name"] for p in listed["items"] if not p["metadata"].get("deletionTimestamp")}
            return len(current) == len(listed["items"]) and self.leader() in current

        wait_for("a pod of the new rollout to lead", new_leader, timeout, self.tail)

    def crash(self) -> None:
        """SIGKILL to the leading operator's process in its container: no chance to clean up."""
        pod = self.pod()
        (status,) = pod["status"]["containerStatuses"]
        self.killed, self.restarts = pod["metadata"]["name"], status["restartCount"]
        self.cp.node.ctr("tasks", "kill", "-s", "SIGKILL", status["containerID"].removeprefix("containerd://"))

    def rss_mb(self) -> float:
        """Resident memory of the operator's process, read from /proc on the node."""
        (status,) = self.pod()["status"]["containerStatuses"]
        container = status["containerID"].removeprefix("containerd://")
        listing = self.cp.node.ctr("tasks", "ls").stdout.splitlines()
        pid = next(line.split()[1] for line in listing if line.startswith(container))
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmRSS for the operator's process {pid}")

    def wait_restarted(self, timeout: float = 240) -> None:
        """The killed container is back (as a standby, or leading again) and some replica leads."""
        def restarted():
            pods = self.pods()
            killed = [p["status"]["containerStatuses"][0] for p in pods if p["metadata"]["name"] == self.killed]
            back = not killed or (killed[0]["restartCount"] > self.restarts and killed[0].get("ready"))
            return back and self.leader() in {p["metadata"]["name"] for p in pods}

        wait_for("the operator container to restart", restarted, timeout, self.tail)

    def tail(self, lines: int = 60) -> str:
        result = self.cp.kubectl("logs", "-n", OPERATOR_NS, self.pod()["metadata"]["name"], f"--tail={lines}",
                                 check=False)
        return result.stdout + result.stderr

    def logs(self) -> str:
        return self.cp.kubectl("logs", "-n", OPERATOR_NS, self.pod()["metadata"]["name"]).stdout


@pytest.fixture(scope="module")
def installed(control_plane):
    """What a user applies on kind: the CRD + manifests/base (namespace, service account, RBAC, the
    Deployment) through the kind overlay (images never pulled)."""
    control_plane.kubectl("apply", "-k", str(REPO / "manifests" / "overlays" / "kind"))
    control_plane.kubectl("wait", "--for=condition=Established", "crd/modeloptimizations.mlopt.io", "--timeout=60s")
    return control_plane


@pytest.fixture(scope="module")
def operator(installed, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("operator")
    deployment = OperatorDeployment(installed, token_kubeconfig(installed, workdir / "kubeconfig"))
    deployment.wait_ready()
    yield deployment


# Every worker here runs where PodSecurity admission enforces `restricted` (the API server's default
# plugin), as a careful cluster's team namespaces do: a worker pod that loosened its securityContext
# would be refused, and every test below that expects a Job to run would fail.
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}


@pytest.fixture
def namespace(control_plane):
    name = control_plane.create_namespace("e2e", labels=RESTRICTED)
    yield name
    control_plane.delete_namespace(name)


# --------------------------------------------------------------------------------------------------
# Helpers


def digits(name: str, **spec) -> dict:
    body = {
        "model": {"source": "zoo:digits"},
        "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"}],
        "data": {"samples": 16},
        "benchmark": {"warmup": 1, "runs": DIGITS_RUNS},
        **spec,
    }
    return {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": name}, "spec": body}


def long_running(name: str, **spec) -> dict:
    """A run that lasts minutes (the CRNN, 10,000 timed runs: the most the spec allows), for tests
    that act while the worker runs."""
    return digits(name, model={"source": "zoo:crnn"}, benchmark={"warmup": 1, "runs": 10_000}, **spec)


def apply(cp, namespace: str, document: dict, check: bool = True) -> subprocess.CompletedProcess:
    return cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document), check=check)


def get_mo(cp, namespace: str, name: str) -> dict:
    return cp.kubectl_json("get", "modeloptimization", name, "-n", namespace)


def wait_status(cp, operator, namespace: str, name: str, predicate, timeout: float = 240) -> dict:
    last: dict = {}

    def check():
        nonlocal last
        last = get_mo(cp, namespace, name)
        return last if predicate(last.get("status") or {}) else None

    return wait_for(f"{name}'s status", check, timeout,
                    lambda: f"status: {json.dumps(last.get('status'), indent=1)}\noperator log:\n{operator.tail()}")


def phase_is(*phases):
    return lambda status: status.get("phase") in phases


def jobs(cp, namespace: str, name: str) -> list[dict]:
    return cp.kubectl_json("get", "jobs", "-n", namespace, "-l", f"mlopt.io/name={name}")["items"]


def pods(cp, namespace: str, name: str) -> list[dict]:
    return cp.kubectl_json("get", "pods", "-n", namespace, "-l", f"mlopt.io/name={name}")["items"]


def events(cp, namespace: str, name: str) -> list[dict]:
    return cp.kubectl_json(
        "get", "events", "-n", namespace,
        "--field-selector", f"involvedObject.kind=ModelOptimization,involvedObject.name={name}",
    )["items"]


def worker_pids(marker: str) -> list[int]:
    """The worker processes (in their containers, seen from the host) whose MLOPT_SPEC names this resource."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"MLOPT_SPEC=" in environ and marker.encode() in environ and b"worker" in cmdline:
            found.append(int(proc.name))
    return found


# --------------------------------------------------------------------------------------------------
# Acceptance


def test_runs_under_its_own_service_account_with_only_the_manifests_rbac(operator, control_plane):
    token_config = str(operator.kubeconfig)

    def can(*args):
        result = control_plane.kubectl("auth", "can-i", *args, f"--kubeconfig={token_config}", check=False)
        return result.stdout.strip()

    assert control_plane.kubectl("auth", "whoami", f"--kubeconfig={token_config}", "-o", "json", check=False
                                 ).stdout.count(f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}") >= 1
    assert can("create", "jobs.batch", "-A") == "yes"
    pod = operator.pod()
    assert pod["spec"]["serviceAccountName"] == OPERATOR_SA and pod["status"]["phase"] == "Running"
    assert can("patch", "modeloptimizations.mlopt.io/status", "-A") == "yes"
    assert can("get", "configmap/mlopt-policy", "-n", OPERATOR_NS) == "yes"  # the policy, by name only
    for verb, resource in (("get", "secrets"), ("create", "pods"), ("delete", "modeloptimizations.mlopt.io"),
                           ("list", "customresourcedefinitions"), ("update", "jobs.batch"), ("list", "configmaps")):
        assert can(verb, resource, "-A") == "no", f"the operator may {verb} {resource}"
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0, operator.tail()
    assert "Forbidden" not in operator.logs(), operator.tail()


def test_mlopt_operator_cli_runs_the_operator(installed, tmp_path):
    """`mlopt operator` (the CLI) starts the same operator; it is healthy under the SA's token."""
    cli = OperatorProcess(token_kubeconfig(installed, tmp_path / "kubeconfig"), tmp_path,
                          [str(Path(sys.executable).with_name("mlopt")), "operator"])
    try:
        cli.start()
    finally:
        cli.stop()


def test_schema_violations_are_refused_naming_the_field(operator, control_plane, namespace):
    result = apply(control_plane, namespace, digits("bad-runs", benchmark={"runs": 0}), check=False)
    assert result.returncode != 0 and "spec.benchmark.runs" in result.stderr, result.stderr
    result = apply(control_plane, namespace, digits("bad-field", benchmark={"rnus": 5}), check=False)
    assert result.returncode != 0 and "rnus" in result.stderr, result.stderr
    state_dict = digits("bad-state-dict", model={"source": "model.pt", "format": "state-dict",
                                                 "inputs": [{"name": "x", "shape": [1, 4]}]})
    result = apply(control_plane, namespace, state_dict, check=False)
    assert result.returncode != 0 and "model.entrypoint" in result.stderr, result.stderr


def test_digits_succeeds_with_results_in_status(operator, control_plane, namespace):
    apply(control_plane, namespace, digits("digits"))
    mo = wait_status(control_plane, operator, namespace, "digits", phase_is("Succeeded", "Failed"))
    status = mo["status"]
    assert status["phase"] == "Succeeded", status
    assert status["observedGeneration"] == 1 and status["jobName"] == "digits-g1"
    assert status["baseline"]["name"] == "pytorch-fp32"
    assert [v["name"] for v in status["variants"]] == ["onnx-fp32"]
    assert status["startTime"] and status["completionTime"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"
    reasons = [e["reason"] for e in events(control_plane, namespace, "digits")]
    assert "JobCreated" in reasons and "Completed" in reasons, reasons


@pytest.mark.slow
def test_example_crnn_succeeds_and_get_prints_the_columns(operator, control_plane, namespace):
    control_plane.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "crnn.yaml"))
    mo = wait_status(control_plane, operator, namespace, "crnn", phase_is("Succeeded", "Failed"), timeout=1500)
    status = mo["status"]
    assert status["phase"] == "Succeeded", status
    assert status["baseline"]["latencyMs"]["mean"] > 0
    assert len(status["variants"]) >= 2 and status["best"]
    table = control_plane.kubectl("get", "modeloptimizations", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "BEST", "SIZE", "LATENCY", "SPEEDUP", "RECOMMENDED", "AGE"]
    # RECOMMENDED is empty without spec.targets (kubectl prints a missing field as a blank or <none>)
    assert re.search(r"^crnn\s+Succeeded\s+\S+\s+[\d.]+ [kM]B\s+[\d.]+ ms\s+[\d.]+x\s+(<none>\s+)?\S+$", row), table
    print(table)
    logs = control_plane.kubectl("logs", "-n", namespace, f"job/{status['jobName']}").stdout
    assert "export" in logs and "benchmark" in logs, logs[-3000:]  # the worker's progress, step by step
    print(logs[-2000:])


def test_model_that_cannot_load_fails_with_reason_and_event(operator, control_plane, namespace):
    spec = digits("no-model", model={"source": "/nonexistent/model.pt", "format": "torchscript",
                                     "inputs": [{"name": "x", "shape": [1, 4]}]})
    apply(control_plane, namespace, spec)
    status = wait_status(control_plane, operator, namespace, "no-model", phase_is("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Failed"
    assert status["reason"] == "ModelLoadFailed", status
    assert "/nonexistent/model.pt" in status["message"]
    assert status["exitCode"] == 1
    warnings = [e for e in events(control_plane, namespace, "no-model") if e["type"] == "Warning"]
    assert any(e["reason"] == "ModelLoadFailed" for e in warnings), warnings


def test_killed_worker_fails_with_the_exit_code(operator, control_plane, namespace):
    name = "killed-worker"
    apply(control_plane, namespace, long_running(name))
    wait_status(control_plane, operator, namespace, name, phase_is("Running"))
    marker = f'"name":"{name}","namespace":"{namespace}"'
    pids = wait_for("the worker process", lambda: worker_pids(marker), 60)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Failed"
    assert status["exitCode"] == 137, status
    assert "exit code 137" in status["message"]
    assert status["reason"] == "BackoffLimitExceeded"


def test_worker_pod_is_locked_down_as_seen_from_inside(operator, control_plane, namespace):
    """uid 10001, read-only root, no service-account token, no capabilities: read in the pod itself."""
    name = "locked-down"
    apply(control_plane, namespace, long_running(name))
    wait_status(control_plane, operator, namespace, name, phase_is("Running"))
    (pod,) = pods(control_plane, namespace, name)
    # The manifests say mlopt/worker:0.1.0; the runtime reports the image it really ran, fully qualified.
    assert pod["status"]["containerStatuses"][0]["image"] == WORKER_IMAGE
    probe = (
        "import json, os\n"
        "try:\n    open('/probe', 'w'); root = 'writable'\nexcept OSError as err:\n    root = err.strerror\n"
        "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))]\n"
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'root': root, 'caps': caps,\n"
        "  'token': os.path.exists('/var/run/secrets/kubernetes.io/serviceaccount/token'),\n"
        "  'scratch': os.access('/scratch', os.W_OK)}))\n"
    )
    seen = json.loads(control_plane.kubectl("exec", "-n", namespace, pod["metadata"]["name"], "--",
                                            "python", "-c", probe).stdout)
    assert seen == {"uid": 10001, "gid": 10001, "root": "Read-only file system", "caps": ["0" * 16] * 3,
                    "token": False, "scratch": True}, seen


def test_memory_limit_ends_failed_with_oomkilled_from_the_kernel(operator, control_plane, namespace):
    name = "tiny-memory"
    apply(control_plane, namespace, digits(name, job={"resources": {"limits": {"memory": "48Mi"}}}))
    status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Failed" and status["reason"] == "OOMKilled", status
    assert "limit 48Mi" in status["message"] and "spec.job.resources.limits.memory" in status["message"]
    (pod,) = pods(control_plane, namespace, name)
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "OOMKilled" and terminated["exitCode"] == 137


@contextlib.contextmanager
def policy(cp, text: str):
    """The mlopt-policy ConfigMap holds `text` for the block, then the install's default again; the
    operator reads it before each Job (no restart)."""
    default = (REPO / "manifests" / "base" / "policy.yaml").read_text()
    document = yaml.safe_load(default)
    document["data"]["policy.yaml"] = text
    cp.kubectl("apply", "-f", "-", input=json.dumps(document))
    try:
        time.sleep(CACHE_SECONDS + 1)  # the operator's cached policy expires
        yield
    finally:
        cp.kubectl("apply", "-f", "-", input=default)
        time.sleep(CACHE_SECONDS + 1)


def test_missing_image_with_pull_policy_never_fails_with_the_reason(operator, control_plane, namespace):
    name = "no-image"
    with policy(control_plane, "allowedImages: [docker.io/mlopt/worker:*]"):
        apply(control_plane, namespace, digits(name, job={"image": "docker.io/mlopt/worker:not-built"}))
        status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"),
                             timeout=120)["status"]  # the Job's deadline is 3600 s: this is not it
    assert status["phase"] == "Failed" and status["reason"] == "ErrImageNeverPull", status
    assert "mlopt/worker:not-built" in status["message"] and "imagePullPolicy is Never" in status["message"]
    wait_for("the Job to be deleted", lambda: not jobs(control_plane, namespace, name), 60)


def test_resources_outside_the_policy_fail_naming_the_rule_and_get_no_job(operator, control_plane, namespace, figure):
    """The default install's policy: only the worker images, no blanket toleration, at most 64Gi."""
    asks = {
        "other-image": ({"image": "docker.io/library/python:3.11"}, "allowedImages"),
        "tolerate-all": ({"tolerations": [{"operator": "Exists"}]}, "allowedTolerationKeys"),
        "too-much-memory": ({"resources": {"limits": {"memory": "100Gi"}}}, "maxMemory"),
    }
    started = time.monotonic()
    for name, (job, _) in asks.items():
        apply(control_plane, namespace, digits(name, job=job))
    for name, (_, rule) in asks.items():
        status = wait_status(control_plane, operator, namespace, name, phase_is("Failed", "Succeeded", "Pending"),
                             timeout=60)["status"]
        assert status["phase"] == "Failed" and status["reason"] == "PolicyViolation", status
        assert rule in status["message"] and "mlopt-system/mlopt-policy" in status["message"], status
        assert "PolicyViolation" in _event_reasons(control_plane, namespace, name)
        assert not jobs(control_plane, namespace, name)
    figure(f"policy: 3 resources refused with the rule named within {time.monotonic() - started:.0f} s")


def test_an_image_that_cannot_be_pulled_says_so_then_fails_after_the_wait(operator, control_plane, namespace, figure):
    """IfNotPresent from a registry the node cannot reach: Pending with ErrImagePull/ImagePullBackOff and
    an Event within a minute, Failed once MLOPT_WAIT_IMAGE_SECONDS (20 s here) has passed."""
    deployment = ("deployment/mlopt-operator", "-n", OPERATOR_NS)
    control_plane.kubectl("set", "env", *deployment, "MLOPT_IMAGE_PULL_POLICY=IfNotPresent", "MLOPT_WAIT_IMAGE_SECONDS=20")
    operator.wait_ready()
    name = "unpullable"
    try:
        with policy(control_plane, "allowedImages: [registry.invalid/*]"):
            apply(control_plane, namespace, digits(name, job={"image": "registry.invalid/mlopt/worker:none"}))
            started = time.monotonic()
            status = wait_status(control_plane, operator, namespace, name,
                                 lambda s: s.get("reason") in ("ErrImagePull", "ImagePullBackOff"), timeout=60)["status"]
            seen = time.monotonic() - started
            assert status["phase"] == "Pending" and "registry.invalid/mlopt/worker:none" in status["message"], status
            assert {"ErrImagePull", "ImagePullBackOff"} & set(_event_reasons(control_plane, namespace, name))
            status = wait_status(control_plane, operator, namespace, name, phase_is("Failed"), timeout=90)["status"]
            figure(f"image pull: Pending ({status['reason']}) after {seen:.0f} s, Failed after "
                  f"{time.monotonic() - started:.0f} s")
            assert status["reason"] in ("ErrImagePull", "ImagePullBackOff") and "limit is 20 s" in status["message"]
    finally:
        control_plane.kubectl("set", "env", *deployment, "MLOPT_IMAGE_PULL_POLICY=Never", "MLOPT_WAIT_IMAGE_SECONDS=300")
        operator.wait_ready()


def test_a_container_that_cannot_be_configured_says_why(operator, control_plane, namespace):
    """storage.secretRef names a Secret that does not exist: CreateContainerConfigError in status with
    an Event within a minute (the Secret may still be created, so it waits before Failed)."""
    name = "no-secret"
    apply(control_plane, namespace, digits(name, storage={"secretRef": "does-not-exist"}))
    status = wait_status(control_plane, operator, namespace, name,
                         lambda s: s.get("reason") == "CreateContainerConfigError", timeout=60)["status"]
    assert status["phase"] == "Pending" and "does-not-exist" in status["message"], status
    assert "CreateContainerConfigError" in _event_reasons(control_plane, namespace, name)


def test_a_job_the_api_server_refuses_fails_at_once_with_its_message(operator, control_plane, namespace):
    """A nodeSelector key that is not a label key passes the spec (any string map) but not the API
    server: Failed with the API server's words, not a retry every 5 s with no phase."""
    name = "bad-selector"
    apply(control_plane, namespace, digits(name, job={"nodeSelector": {"gpu type": "a100"}}))
    status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"),
                         timeout=60)["status"]
    assert status["phase"] == "Failed" and status["reason"] == "JobRejected", status
    assert "nodeSelector" in status["message"] and "gpu type" in status["message"], status
    assert not jobs(control_plane, namespace, name)


def test_deadline_exceeded_is_explained(operator, control_plane, namespace):
    name = "too-slow"
    apply(control_plane, namespace, long_running(name, job={"activeDeadlineSeconds": 8}))
    status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Failed"
    assert status["reason"] == "DeadlineExceeded", status
    assert "activeDeadlineSeconds (8 s)" in status["message"]
    marker = f'"name":"{name}","namespace":"{namespace}"'
    wait_for("the worker process to stop", lambda: not worker_pids(marker), 60)


def test_restart_during_a_run_adopts_the_job(operator, control_plane, namespace):
    name = "restart"
    apply(control_plane, namespace, digits(name, benchmark={"warmup": 1, "runs": 2000}))
    wait_status(control_plane, operator, namespace, name, phase_is("Running"))
    operator.crash()
    assert len(jobs(control_plane, namespace, name)) == 1
    operator.wait_restarted()
    status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded", status
    found = jobs(control_plane, namespace, name)
    assert [j["metadata"]["name"] for j in found] == [f"{name}-g1"]
    assert len(pods(control_plane, namespace, name)) == 1


def test_spec_change_runs_a_new_job_and_observed_generation_follows(operator, control_plane, namespace):
    name = "edited"
    apply(control_plane, namespace, long_running(name))
    wait_status(control_plane, operator, namespace, name, phase_is("Running"))
    apply(control_plane, namespace, digits(name))  # runs back to DIGITS_RUNS: generation 2
    status = wait_status(
        control_plane, operator, namespace, name,
        lambda s: s.get("observedGeneration") == 2 and s.get("phase") in ("Succeeded", "Failed"),
    )["status"]
    assert status["phase"] == "Succeeded", status
    assert status["jobName"] == f"{name}-g2"
    wait_for("generation 1's Job and pod to be gone",
             lambda: [j["metadata"]["name"] for j in jobs(control_plane, namespace, name)] == [f"{name}-g2"]
             and all(p["metadata"]["labels"]["mlopt.io/generation"] == "2" for p in pods(control_plane, namespace, name)),
             120)
    reasons = [e["reason"] for e in events(control_plane, namespace, name)]
    assert reasons.count("JobCreated") == 2, reasons


def test_deleting_the_resource_garbage_collects_job_and_pods(operator, control_plane, namespace):
    name = "deleted"
    apply(control_plane, namespace, long_running(name))
    wait_status(control_plane, operator, namespace, name, phase_is("Running"))
    assert jobs(control_plane, namespace, name) and pods(control_plane, namespace, name)
    control_plane.kubectl("delete", "modeloptimization", name, "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for("the Job and its pods to be garbage-collected",
             lambda: not jobs(control_plane, namespace, name) and not pods(control_plane, namespace, name), 120)
    marker = f'"name":"{name}","namespace":"{namespace}"'
    wait_for("the worker process to stop", lambda: not worker_pids(marker), 60)


@pytest.mark.parametrize("overlay", ["kind", "gpu"])
def test_overlays_pass_a_server_side_dry_run(installed, overlay):
    result = installed.kubectl("apply", "--dry-run=server", "-k", str(REPO / "manifests" / "overlays" / overlay))
    assert "deployment.apps/mlopt-operator" in result.stdout


# --------------------------------------------------------------------------------------------------
# Storage: the model in from S3, the optimized model and the report out to S3 (tests/s3_server.py)


def _onnx_model(path: Path, hidden: int) -> Path:
    """A user's ONNX model (two Linear layers); `hidden` sets its size: 8·hidden KiB of weights."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)).eval()
    torch.onnx.export(model, (torch.rand(2, 256),), str(path), input_names=["x"], dynamo=False,
                      dynamic_axes={"x": {0: "batch"}})
    return path


def _s3_output(control_plane, namespace, s3_server, name: str) -> tuple[str, dict]:
    """spec.output in the results bucket and spec.storage with the credentials as a Secret."""
    credentials = [f"--from-literal={k}={v}" for k, v in s3_server.credentials().items()]
    control_plane.kubectl("create", "secret", "generic", "s3-creds", "-n", namespace, *credentials, check=False)
    return (f"s3://{s3_server.bucket('results')}/{namespace}/{name}/",
            {"secretRef": "s3-creds", "endpoint": s3_server.endpoint})


def _stored_serving_layout(files: dict[str, Path], output: str) -> dict:
    """The serving layout a run stored under `output` (files: its stored files by path below output),
    checked as a server and KServe read it: a Triton repository with the ONNX model and its config,
    and an InferenceService whose storageUri is that repository where the run stored it.
    Returns the InferenceService."""
    manifest = yaml.safe_load(files["serving/inferenceservice.yaml"].read_text())
    model = manifest["spec"]["predictor"]["model"]
    name = manifest["metadata"]["name"]
    assert manifest["kind"] == "InferenceService" and model["storageUri"] == output + "serving", manifest
    assert model["modelFormat"]["name"] == "onnx" and model["runtime"] == "kserve-tritonserver", manifest
    assert {f"serving/{name}/config.pbtxt", f"serving/{name}/1/model.onnx", "serving/README.md"} <= files.keys()
    assert f'name: "{name}"' in files[f"serving/{name}/config.pbtxt"].read_text()
    return manifest


def _s3_setup(control_plane, namespace, s3_server, tmp_path, name: str, hidden: int) -> tuple[dict, str]:
    from optimizer.artifacts.storage import S3Settings, _store

    import obstore

    os.environ.update(s3_server.credentials())  # this test process's own client, as a user's laptop would
    try:
        store = _store(s3_server.bucket("models"), S3Settings(endpoint=s3_server.endpoint))
        obstore.put(store, f"{namespace}/{name}.onnx", _onnx_model(tmp_path / f"{name}.onnx", hidden))
    finally:
        for key in s3_server.credentials():
            os.environ.pop(key, None)
    output, storage = _s3_output(control_plane, namespace, s3_server, name)
    spec = digits(name, model={"source": f"s3://models/{namespace}/{name}.onnx",
                               "inputs": [{"name": "x", "shape": [1, 256], "dynamicAxes": {0: "batch"}}]},
                  variants=[{"name": "onnx-fp32", "recipe": "onnx-fp32"},
                            {"name": "int8", "recipe": "ort-int8-dynamic"}],
                  output=output, storage=storage,
                  # enough runs that ONNX Runtime's lead over eager PyTorch shows on a busy machine
                  benchmark={"warmup": 5, "runs": 40})
    return spec, output


def test_model_from_s3_optimized_model_to_s3_with_its_uri_in_status(operator, control_plane, namespace, s3_server,
                                                                   tmp_path):
    import hashlib

    import numpy as np
    import onnxruntime as ort

    spec, output = _s3_setup(control_plane, namespace, s3_server, tmp_path, "from-s3", hidden=1024)
    apply(control_plane, namespace, spec)
    status = wait_status(control_plane, operator, namespace, "from-s3", phase_is("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded", status
    assert status.get("best"), status["message"]  # a best variant, so there is a best model to store
    assert status["results"] == output + "results.json" and status["output"] == output
    best = status["artifacts"]["best"]
    assert best["uri"].startswith(output + "models/") and best["uri"].endswith(".onnx")

    key = best["uri"].removeprefix("s3://results/")
    stored = s3_server.objects("results")[key]  # the object the server holds, as a client downloads it
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == best["sha256"] and stored.stat().st_size == best["sizeBytes"]
    session = ort.InferenceSession(str(stored), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((4, 256), np.float32)})[0].shape == (4, 10)
    wide = control_plane.kubectl("get", "modeloptimizations", "from-s3", "-n", namespace, "-o", "wide").stdout
    assert "OUTPUT" in wide.splitlines()[0] and output in wide, wide


def test_worker_killed_during_upload_leaves_no_results_json_and_fails(operator, control_plane, namespace, s3_server,
                                                                     tmp_path):
    name = "upload-killed"
    # 16 MB of FP32 weights plus its variants: the upload takes long enough to be caught in the middle.
    spec, output = _s3_setup(control_plane, namespace, s3_server, tmp_path, name, hidden=16384)
    prefix = output.removeprefix("s3://results/")
    apply(control_plane, namespace, spec)
    # Not the write probe the worker puts and deletes before any work (spec.output is checked first):
    # killing the worker then would test nothing about the upload, and leave no object behind.
    uploaded = lambda: [k for k in s3_server.objects("results")  # noqa: E731
                        if k.startswith(prefix) and PROBE_PREFIX not in k]
    wait_for("the first uploaded object", uploaded, 240, operator.tail, interval=0.01)
    marker = f'"name":"{name}","namespace":"{namespace}"'
    for pid in worker_pids(marker):
        os.kill(pid, signal.SIGKILL)
    status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Failed", status
    assert status["exitCode"] == 137
    keys = uploaded()
    assert keys and prefix + "results.json" not in keys, keys  # partial upload: readers see no results


# --------------------------------------------------------------------------------------------------
# pvc://: the model from a PersistentVolumeClaim, the optimized model written back to it


def test_model_from_a_claim_optimized_model_back_on_the_volume(operator, control_plane, namespace, tmp_path):
    import hashlib

    volume = tmp_path / "volume"
    (volume / "in").mkdir(parents=True)
    # 4096 wide: 4 MB of FP32 weights that outgrow the caches, so INT8 wins by a wide margin (6x here)
    # and the run always ships a variant: the artifact checks below are never skipped.
    _onnx_model(volume / "in" / "model.onnx", hidden=4096)
    for path in [volume, *volume.rglob("*")]:
        os.chown(path, 10001, 10001)  # the worker runs as 10001; hostPath volumes get no fsGroup
    pv_name = f"pv-{namespace}"
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                  "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(volume), "type": "Directory"},
                  "claimRef": {"namespace": namespace, "name": "models"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models", "namespace": namespace},
         "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv_name,
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]}))
    wait_for("the claim to bind", lambda: control_plane.kubectl_json(
        "get", "pvc", "models", "-n", namespace)["status"].get("phase") == "Bound", 60)
    spec = digits("from-pvc", model={"source": "pvc://models/in/model.onnx",
                                     "inputs": [{"name": "x", "shape": [1, 256], "dynamicAxes": {0: "batch"}}]},
                  variants=[{"name": "onnx-fp32", "recipe": "onnx-fp32"},
                            {"name": "int8", "recipe": "ort-int8-dynamic"}],
                  output="pvc://models/", benchmark={"warmup": 5, "runs": 40})
    apply(control_plane, namespace, spec)
    try:
        status = wait_status(control_plane, operator, namespace, "from-pvc", phase_is("Succeeded", "Failed"))["status"]
        assert status["phase"] == "Succeeded", status
        # the claim's root: its mount point sits on the pod's read-only root filesystem, so the run
        # must stage inside the claim, and the user's files there (in/) stay
        assert status["output"] == "pvc://models/" and status["results"] == "pvc://models/results.json"
        results = json.loads((volume / "results.json").read_text())
        assert (volume / "in" / "model.onnx").is_file() and not list(volume.glob(".mlopt-partial-*"))
        assert results["best"] == status.get("best")  # None (no key in status) when nothing beat the baseline
        for stored in results["outputs"]:  # the whole run is on the volume, byte for byte
            on_volume = volume / stored["path"]
            assert hashlib.sha256(on_volume.read_bytes()).hexdigest() == stored["sha256"], stored["path"]
        assert any(o["path"].startswith("models/") for o in results["outputs"]), results["outputs"]
        assert status.get("best") == "int8", status
        best = status["artifacts"]["best"]
        assert best["uri"].startswith("pvc://models/models/"), best
        on_volume = volume / best["uri"].removeprefix("pvc://models/")
        assert on_volume.is_file() and hashlib.sha256(on_volume.read_bytes()).hexdigest() == best["sha256"]
        # the serving layout, on the claim where KServe's storage initializer reads it (pvc://<claim>/<path>)
        layout = {p.relative_to(volume).as_posix(): p for p in (volume / "serving").rglob("*") if p.is_file()}
        _stored_serving_layout(layout, "pvc://models/")
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False,
                              timeout=150)
        control_plane.kubectl("delete", "pv", pv_name, "--wait=false", check=False)


def _event_reasons(cp, namespace: str, name: str) -> list[str]:
    return [e["reason"] for e in events(cp, namespace, name)]


def test_a_pod_the_job_cannot_create_is_explained_then_fails(operator, control_plane, namespace, figure):
    """The Job controller cannot create the pod (its service account does not exist): the Job's
    FailedCreate event is in status within a minute, and after the operator's wait (60 s) it is Failed."""
    name = "no-account"
    apply(control_plane, namespace, digits(name, job={"serviceAccountName": "does-not-exist"}))
    started = time.monotonic()
    status = wait_status(control_plane, operator, namespace, name, lambda s: s.get("reason") == "FailedCreate",
                         timeout=60)["status"]
    assert status["phase"] == "Pending" and "does-not-exist" in status["message"], status
    assert "FailedCreate" in _event_reasons(control_plane, namespace, name)
    status = wait_status(control_plane, operator, namespace, name, phase_is("Failed"), timeout=90)["status"]
    figure(f"FailedCreate: Pending after {time.monotonic() - started:.0f} s in all, then Failed: {status['message'][:120]}")
    assert status["reason"] == "FailedCreate" and "limit is 60 s" in status["message"], status
    wait_for("the Job to be deleted", lambda: not jobs(control_plane, namespace, name), 60)


def test_an_unschedulable_pod_says_why_within_a_minute(operator, control_plane, namespace):
    name = "nowhere"
    apply(control_plane, namespace, digits(name, job={"nodeSelector": {"mlopt.io/no-such-node": "x"}}))
    status = wait_status(control_plane, operator, namespace, name, lambda s: s.get("reason") == "Unschedulable",
                         timeout=60)["status"]
    assert status["phase"] == "Pending" and "node" in status["message"], status
    assert "Unschedulable" in _event_reasons(control_plane, namespace, name)


def test_a_name_longer_than_a_label_is_refused_by_kubectl_apply(operator, control_plane, namespace):
    result = apply(control_plane, namespace, digits("n" * 64), check=False)
    assert result.returncode != 0 and "metadata.name must be at most 63 characters" in result.stderr, result.stderr


def test_over_the_cap_resources_queue_and_run_one_at_a_time(operator, control_plane, namespace, figure):
    """MLOPT_MAX_RUNNING=1: three resources, never two Jobs running at once, the others Queued with
    their position, each ends Succeeded with exactly one Job."""
    deployment = ("deployment/mlopt-operator", "-n", OPERATOR_NS)
    control_plane.kubectl("set", "env", *deployment, "MLOPT_MAX_RUNNING=1")
    operator.wait_ready()
    try:
        names = [f"queued-{index}" for index in range(3)]
        for name in names:
            apply(control_plane, namespace, digits(name))
        most_running, positions, started = 0, set(), time.monotonic()

        def all_done():
            nonlocal most_running
            found = control_plane.kubectl_json("get", "jobs", "-n", namespace, "-l", "app.kubernetes.io/managed-by=mlopt-operator")
            running = [j for j in found["items"] if not any(c["status"] == "True" and c["type"] in ("Complete", "Failed")
                                                            for c in j.get("status", {}).get("conditions") or [])]
            most_running = max(most_running, len(running))
            statuses = [get_mo(control_plane, namespace, name).get("status") or {} for name in names]
            positions.update(s.get("queuePosition") for s in statuses if s.get("phase") == "Queued")
            return all(s.get("phase") in ("Succeeded", "Failed") for s in statuses)

        wait_for("every queued resource to finish", all_done, 300, operator.tail, interval=0.5)
        figure(f"queue: 3 resources drained in {time.monotonic() - started:.0f} s, at most {most_running} Job(s) "
              f"running at once, positions seen {sorted(p for p in positions if p)}")
        assert most_running == 1 and {1, 2} <= positions
        for name in names:
            assert get_mo(control_plane, namespace, name)["status"]["phase"] == "Succeeded"
            assert [j["metadata"]["name"] for j in jobs(control_plane, namespace, name)] == [f"{name}-g1"]
            assert "OverCap" in _event_reasons(control_plane, namespace, name) or name == names[0]
    finally:
        control_plane.kubectl("set", "env", *deployment, "MLOPT_MAX_RUNNING=8")
        operator.wait_ready()


def workloads(cp, namespace: str) -> dict[str, dict]:
    """Kueue's Workloads in the namespace, by the name of the Job that owns each."""
    found = cp.kubectl_json("get", "workloads.kueue.x-k8s.io", "-n", namespace)["items"]
    return {ref["name"]: w for w in found for ref in w["metadata"].get("ownerReferences") or [] if ref["kind"] == "Job"}


def condition(obj: dict, kind: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == kind), {})


def running_jobs(cp, namespace: str) -> list[str]:
    """The operator's Jobs that Kueue has unsuspended and Kubernetes has not ended."""
    found = cp.kubectl_json("get", "jobs", "-n", namespace, "-l", "app.kubernetes.io/managed-by=mlopt-operator")["items"]
    return [j["metadata"]["name"] for j in found if not j["spec"].get("suspend")
            and not any(c["status"] == "True" and c["type"] in ("Complete", "Failed") for c in j.get("status", {}).get("conditions") or [])]


def test_kueue_itself_admits_a_resource_with_a_queue_name_and_it_succeeds(operator, control_plane, namespace, kueue):
    """spec.job.queueName: the Job is created suspended with Kueue's label; the real Kueue makes a
    Workload for it, admits it into the ClusterQueue's flavor and unsuspends it; the run succeeds."""
    queue = kueue.local_queue(namespace, "team-queue")
    name = "kueued"
    apply(control_plane, namespace, digits(name, job={"queueName": queue}))
    status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"), timeout=300)
    assert status["status"]["phase"] == "Succeeded", status["status"]
    (job,) = jobs(control_plane, namespace, name)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue and job["spec"]["suspend"] is False
    workload = workloads(control_plane, namespace)[job["metadata"]["name"]]
    # The operator finds Kueue's reasons by this name (events on the Workload).
    assert workload["metadata"]["name"] in kueue_workload_names(job["metadata"]["name"], job["metadata"]["uid"])
    admission = workload["status"]["admission"]
    assert admission["clusterQueue"] == kueue.ensure_cluster_queue(), admission
    assert admission["podSetAssignments"][0]["flavors"]["cpu"] == FLAVOR, admission
    assert condition(workload, "Admitted")["status"] == "True", workload["status"]
    assert condition(workload, "Finished")["status"] == "True", workload["status"]


def test_kueue_holds_the_second_resource_while_the_quota_is_full_then_runs_it(operator, control_plane, namespace,
                                                                               kueue, figure):
    """The ClusterQueue has CPU for one worker: of two resources in its queue, one runs while the
    other's Job stays suspended and its status says it waits for Kueue; when the first ends the
    quota frees and Kueue admits the second. Both succeed; their admissions never overlap."""
    queue = kueue.local_queue(namespace, "team-queue")
    names = ["kueued-a", "kueued-b"]
    for name in names:
        apply(control_plane, namespace, digits(name, job={"queueName": queue}))
    most_running, waited_while_other_ran, started = 0, set(), time.monotonic()
    pending_messages: set[str] = set()  # the waiting Workload's QuotaReserved=False message, from Kueue
    waiting_messages: set[str] = set()  # the waiting resource's status.message

    def all_done():
        nonlocal most_running
        running = running_jobs(control_plane, namespace)
        most_running = max(most_running, len(running))
        statuses = {name: get_mo(control_plane, namespace, name).get("status") or {} for name in names}
        for name, status in statuses.items():
            others_running = [j for j in running if not j.startswith(f"{name}-")]
            if status.get("reason") == "WaitingForKueue" and others_running:
                assert status["phase"] == "Queued" and queue in status["message"], status
                waited_while_other_ran.add(name)
                waiting_messages.add(status["message"])
                workload = workloads(control_plane, namespace).get(f"{name}-g1", {})
                if condition(workload, "QuotaReserved").get("status") == "False":
                    pending_messages.add(condition(workload, "QuotaReserved")["message"])
        return all(s.get("phase") in ("Succeeded", "Failed") for s in statuses.values())

    wait_for("both queued resources to finish", all_done, 480, operator.tail, interval=0.5)
    figure(f"kueue: 2 resources through a one-worker ClusterQueue in {time.monotonic() - started:.0f} s, "
           f"at most {most_running} Job(s) unsuspended at once")
    for name in names:
        assert get_mo(control_plane, namespace, name)["status"]["phase"] == "Succeeded"
    assert most_running == 1 and len(waited_while_other_ran) == 1, (most_running, waited_while_other_ran)
    found = workloads(control_plane, namespace)
    spans = sorted((condition(w, "QuotaReserved")["lastTransitionTime"], condition(w, "Finished")["lastTransitionTime"])
                   for w in (found[f"{name}-g1"] for name in names))
    assert spans[0][1] <= spans[1][0], f"the two admissions overlapped: {spans}"
    # Kueue itself held it for quota: its Workload said so while it waited.
    assert any("insufficient unused quota for cpu" in m for m in pending_messages), pending_messages
    # ... and the resource's status passed Kueue's reason on.
    assert any("insufficient unused quota for cpu" in m for m in waiting_messages), waiting_messages


def _job_created_events(cp, namespace: str, name: str) -> int:
    return _event_reasons(cp, namespace, name).count("JobCreated")


def test_killing_the_leader_hands_over_within_30_s_and_nothing_is_handled_twice(operator, control_plane, namespace, figure):
    """Two replicas: SIGKILL the one holding the Lease while a resource runs; the other takes the Lease
    within 30 s, finishes that resource's status and runs one created after the kill, each with one Job."""
    def two_ready():
        pods = operator.pods()
        return len(pods) == 2 and all((p["status"].get("containerStatuses") or [{}])[0].get("ready") for p in pods)

    wait_for("two ready operator replicas", two_ready, 120, operator.tail)
    first = operator.holder()
    apply(control_plane, namespace, digits("before-kill"))
    wait_status(control_plane, operator, namespace, "before-kill", phase_is("Pending", "Running"), timeout=60)
    operator.crash()
    killed_at = time.monotonic()
    # The standby replica and the killed pod's restarted container race for the stale Lease: either is
    # a new process (its own identity); which one won is printed.
    wait_for("another process to hold the lease", lambda: operator.holder() not in (None, first), 60, operator.tail,
             interval=0.5)
    handover = time.monotonic() - killed_at
    successor = operator.holder()
    apply(control_plane, namespace, digits("after-kill"))
    for name in ("before-kill", "after-kill"):
        status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"), timeout=180)
        assert status["status"]["phase"] == "Succeeded", status["status"]
        assert [j["metadata"]["name"] for j in jobs(control_plane, namespace, name)] == [f"{name}-g1"]
        assert _job_created_events(control_plane, namespace, name) == 1
    where = "the other replica" if successor.rsplit("_", 1)[0] != first.rsplit("_", 1)[0] else "the killed pod, restarted"
    figure(f"failover: {first} killed (SIGKILL); {successor} ({where}) leads after {handover:.1f} s")
    assert handover <= 30
    operator.wait_restarted()


def test_metrics_show_real_values_during_a_run(operator, control_plane, namespace, figure):
    name = "metered"
    apply(control_plane, namespace, long_running(name))
    wait_status(control_plane, operator, namespace, name, phase_is("Running"), timeout=120)
    leader = operator.leader()
    text = operator.metrics(leader)
    figure("metrics (leader):\n" + "\n".join(line for line in text.splitlines()
                                            if line.startswith(("mlopt_leader", "mlopt_modeloptimizations{",
                                                                "mlopt_queue_length", "mlopt_jobs_created_total",
                                                                'mlopt_reconcile_seconds_count{handler="run_generation"'))))
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["mlopt_leader"] == 1 and values['mlopt_modeloptimizations{phase="Running"}'] >= 1
    assert values["mlopt_jobs_created_total"] >= 1 and "mlopt_queue_length" in values
    assert values['mlopt_reconcile_seconds_count{handler="run_generation"}'] >= 1
    standby = next(p["metadata"]["name"] for p in operator.pods() if p["metadata"]["name"] != leader)
    assert "mlopt_leader 0.0" in operator.metrics(standby) and "mlopt_modeloptimizations{" not in operator.metrics(standby)
    through_service = control_plane.kubectl(
        "get", "--raw", f"/api/v1/namespaces/{OPERATOR_NS}/services/mlopt-operator-metrics:metrics/proxy/metrics").stdout
    assert "mlopt_leader" in through_service
    control_plane.kubectl("delete", "modeloptimization", name, "-n", namespace, "--wait=false")


LOAD_RESOURCES, LOAD_CAP = 100, 4


def tiny(name: str) -> dict:
    """The smallest real run: the zoo's LSTM text classifier, one variant, three timed runs."""
    return {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": name},
            "spec": {"model": {"source": "zoo:textlstm"}, "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"}],
                     "data": {"samples": 4}, "benchmark": {"warmup": 1, "runs": 3, "scalingBatches": []},
                     "job": {"resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}}}}


def _evict(cp, namespace: str, pod_name: str) -> bool:
    """The Eviction API (what a drain or a preemption does): the pod gets DisruptionTarget, which the
    Job's podFailurePolicy ignores, so the Job makes a new pod."""
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod_name, "namespace": namespace}}
    done = cp.kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod_name}/eviction", "-f", "-",
                      input=json.dumps(eviction), check=False)
    return done.returncode == 0  # else the pod finished or went in between


def test_an_evicted_worker_is_replaced_and_its_results_reach_status(operator, control_plane, namespace):
    """A drain or preemption evicts the running worker: the Job ignores that pod (podFailurePolicy), runs
    a new one, and status shows the new pod's results, not the evicted pod's missing summary."""
    name = "evicted"
    apply(control_plane, namespace, digits(name))
    wait_for("the worker to run", lambda: any(p["status"].get("phase") == "Running"
                                              for p in pods(control_plane, namespace, name)), 120, operator.tail)
    (first,) = [p for p in pods(control_plane, namespace, name) if p["status"].get("phase") == "Running"]
    assert _evict(control_plane, namespace, first["metadata"]["name"])
    status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"), timeout=240)["status"]
    seen = [(p["metadata"]["name"], p["metadata"]["creationTimestamp"], p["status"].get("phase"))
            for p in pods(control_plane, namespace, name)]
    assert status["phase"] == "Succeeded" and status.get("variants") and status.get("baseline"), (status, seen)


def test_a_worker_evicted_right_after_it_exits_0_still_reports_its_results(operator, control_plane, namespace):
    """#29's lost result: the worker finishes (exit 0) and its pod is evicted before the operator has
    read its termination message, the only copy of the summary. With the operator scaled to zero from
    the moment the Job exists, nothing can read the message before the eviction: the pod must stay
    (Terminating, held by the finalizer mlopt.io/summary) until the operator, back, has recorded the
    results, and only then go."""
    name = "evicted-after-exit"
    deployment = ("deployment/mlopt-operator", "-n", OPERATOR_NS)
    replicas = control_plane.kubectl_json("get", *deployment)["spec"]["replicas"]
    # Three recipes (two calibrate) keep the worker busy for seconds after its Job appears: time for the
    # operator to be gone before the worker exits, so nothing reads its message first.
    variants = [{"name": r, "recipe": r} for r in ("onnx-fp32", "ort-int8-dynamic", "ort-int8-static")]
    apply(control_plane, namespace, digits(name, variants=variants))
    wait_for("the Job", lambda: jobs(control_plane, namespace, name), 120, operator.tail)
    control_plane.kubectl("scale", *deployment, "--replicas=0")
    # Gone at once, not after a graceful stop in which it could still record the worker's exit.
    control_plane.kubectl("delete", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=mlopt-operator",
                          "--grace-period=0", "--force", "--wait=false", check=False)
    try:
        wait_for("the operator's pods to go", lambda: not control_plane.kubectl_json(
            "get", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=mlopt-operator")["items"], 120)

        def exited_0() -> dict | None:
            for pod in pods(control_plane, namespace, name):
                for container in pod["status"].get("containerStatuses") or []:
                    if (container["state"].get("terminated") or {}).get("exitCode") == 0:
                        return pod
            return None

        pod = wait_for("the worker to exit 0", exited_0, 240, interval=0.2)
        assert (get_mo(control_plane, namespace, name).get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        assert _evict(control_plane, namespace, pod["metadata"]["name"])  # a finished pod: deleted at once
        held = control_plane.kubectl_json("get", "pod", pod["metadata"]["name"], "-n", namespace)
        assert held["metadata"].get("deletionTimestamp") and "mlopt.io/summary" in held["metadata"]["finalizers"], held
        wait_for("the Job to complete", lambda: any(
            c["type"] == "Complete" and c["status"] == "True"
            for c in (jobs(control_plane, namespace, name)[0]["status"].get("conditions") or [])), 120)
    finally:
        control_plane.kubectl("scale", *deployment, f"--replicas={replicas}")
        operator.wait_ready()
    status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded" and status.get("variants") and status.get("baseline"), status
    wait_for("the evicted pod to be released", lambda: not pods(control_plane, namespace, name), 60, operator.tail)


def test_worker_namespaces_refuse_a_pod_that_breaks_podsecurity_restricted(operator, control_plane, namespace):
    """The namespaces every worker above ran in enforce `restricted`: a pod without its securityContext
    is refused there, so the workers' admission there is a real check, not a label nobody reads."""
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
             "spec": {"containers": [{"name": "c", "image": BASE_IMAGE, "command": ["true"]}]}}
    refused = apply(control_plane, namespace, plain, check=False)
    assert refused.returncode != 0 and 'violates PodSecurity "restricted:latest"' in refused.stderr, refused.stderr
    labels = control_plane.kubectl_json("get", "namespace", namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted", labels


def _overlapping(all_jobs: list[dict], cap: int) -> str:
    """The Jobs open at each moment more than `cap` were, with every time that says when they ran, so a
    breach of the cap can be told from a lagging completionTime."""
    lines = []
    for job in all_jobs:
        start, end = job["status"].get("startTime"), job["status"].get("completionTime") or "9999"
        open_then = [other for other in all_jobs
                     if other["status"]["startTime"] <= start < (other["status"].get("completionTime") or "9999")]
        if len(open_then) > cap:
            lines.append(f"at {start}: " + "; ".join(
                f"{o['metadata']['name']} created {o['metadata']['creationTimestamp']} start {o['status']['startTime']} "
                f"completion {o['status'].get('completionTime')} conditions "
                f"{[(c['type'], c['lastTransitionTime']) for c in o['status'].get('conditions') or []]}"
                for o in open_then))
    return "\n".join(lines) or "no moment over the cap by startTime"


def test_load_and_chaos_100_resources_drain_with_one_job_each(operator, control_plane, namespace, figure):
    """100 resources applied at once with a cap of 4. The first half drains undisturbed (the operator's
    memory is measured across it); during the second half the operator is SIGKILLed twice, the
    kube-apiserver restarted, and running pods evicted. Every resource must end Succeeded with its
    results in status, with exactly one Job, and never more than 4 Jobs running at once."""
    deployment = ("deployment/mlopt-operator", "-n", OPERATOR_NS)
    control_plane.kubectl("set", "env", *deployment, f"MLOPT_MAX_RUNNING={LOAD_CAP}")
    operator.wait_ready()
    names = [f"load-{index:03d}" for index in range(LOAD_RESOURCES)]
    # The disruptions land at random points of the second half (the seed is printed, to replay a failure).
    seed = int(os.environ.get("MLOPT_CHAOS_SEED") or random.SystemRandom().randrange(10_000))
    points = sorted(random.Random(seed).sample(range(52, 96), 5))
    chaos = {50: "rss", **dict(zip(points, ["kill-operator", "evict", "restart-apiserver", "evict", "kill-operator"]))}
    figure(f"chaos seed {seed}: {chaos}")
    done_at: dict[str, float] = {}
    figures = {"max_running": 0, "restarts": 0, "apiserver_restarts": 0, "evicted": 0}
    try:
        started = time.monotonic()
        rss_start = operator.rss_mb()
        control_plane.kubectl("apply", "-n", namespace, "-f", "-",
                              input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [tiny(n) for n in names]}))

        def jobs_now() -> list[dict]:
            return control_plane.kubectl_json("get", "jobs", "-n", namespace, "-l",
                                              "app.kubernetes.io/managed-by=mlopt-operator")["items"]

        def poll() -> bool:
            found = control_plane.kubectl_json("get", "modeloptimizations", "-n", namespace)["items"]
            for item in found:
                if (item.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    done_at.setdefault(item["metadata"]["name"], time.monotonic() - started)
            running = [j for j in jobs_now() if not any(c["status"] == "True" and c["type"] in ("Complete", "Failed")
                                                        for c in j.get("status", {}).get("conditions") or [])]
            figures["max_running"] = max(figures["max_running"], len(running))
            for threshold, action in sorted(chaos.items()):
                if len(done_at) < threshold:
                    break
                if action == "evict":
                    busy = [p for p in control_plane.kubectl_json("get", "pods", "-n", namespace)["items"]
                            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
                    # Right after a disruption no worker may be running yet: evict at a later poll.
                    if not busy or not _evict(control_plane, namespace, busy[0]["metadata"]["name"]):
                        break
                    figures["evicted"] += 1
                chaos.pop(threshold)
                if action == "rss":
                    figures["rss_growth_mb"] = operator.rss_mb() - rss_start
                elif action == "kill-operator":
                    operator.crash()
                    operator.wait_restarted()
                    figures["restarts"] += 1
                elif action == "restart-apiserver":
                    control_plane.restart_apiserver()
                    figures["apiserver_restarts"] += 1
            return len(done_at) == LOAD_RESOURCES

        wait_for("every resource to end", poll, 1800, operator.tail, interval=1.0)
        drained = time.monotonic() - started
        figure(f"load: {LOAD_RESOURCES} resources, cap {LOAD_CAP}: drained in {drained:.0f} s; at most "
              f"{figures['max_running']} Job(s) running at once; operator memory +{figures.get('rss_growth_mb', 0):.1f} MB "
              f"over the first 50; survived {figures['restarts']} operator SIGKILL(s), "
              f"{figures['apiserver_restarts']} kube-apiserver restart(s), {figures['evicted']} pod eviction(s)")
        # The poll above samples once a second; the Jobs' own start and completion times rule out a
        # burst between two samples.
        moments = sorted((moment, step) for job in jobs_now() for moment, step in (
            (job["status"]["startTime"], 1), (job["status"].get("completionTime") or "9999", -1)))
        overlap = max(itertools.accumulate(step for _, step in moments))
        figure(f"load: at most {overlap} Job(s) overlapping by their start/completion times")
        assert figures["max_running"] <= LOAD_CAP and overlap <= LOAD_CAP, _overlapping(jobs_now(), LOAD_CAP)
        assert not chaos, f"disruptions not carried out: {chaos}"
        assert figures["restarts"] == 2 and figures["apiserver_restarts"] == 1 and figures["evicted"] == 2
        assert figures["rss_growth_mb"] < 50
        by_resource: dict[str, list[str]] = {}
        for job in jobs_now():
            by_resource.setdefault(job["metadata"]["labels"]["mlopt.io/name"], []).append(job["metadata"]["name"])
        assert {n: by_resource.get(n) for n in names} == {n: [f"{n}-g1"] for n in names}  # never a duplicate
        for item in control_plane.kubectl_json("get", "modeloptimizations", "-n", namespace)["items"]:
            status = item["status"]
            assert status["phase"] == "Succeeded", (item["metadata"]["name"], status)
            assert status.get("variants") and status.get("baseline") and status["observedGeneration"] == 1, (
                item["metadata"]["name"], status)
    finally:
        control_plane.kubectl("set", "env", *deployment, "MLOPT_MAX_RUNNING=8")
        operator.wait_ready()


# --------------------------------------------------------------------------------------------------
# spec.targets (issue 25): one Job per target, rows in status, a recommendation

TARGETS = [
    # The one test node stands in for two pools: the two targets differ by the resources their pods get.
    # Small requests, so both fit the node beside the operator (and Kueue) at once: a target left Pending
    # for CPU would end Unschedulable after the 30 s wait this test sets.
    {"name": "large", "pricePerHour": 0.20,
     "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "4Gi"}}},
    {"name": "small", "pricePerHour": 0.10,
     "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "4Gi"}}},
    {"name": "nowhere", "pricePerHour": 0.05, "nodeSelector": {"mlopt.io/pool": "no-such-pool"}},  # no node has it
]
QUICK_SWEEP = {"latencySLOMs": 1000, "variants": 1, "maxConcurrency": 2, "secondsPerPoint": 0.5}
# Each target's best must be onnx-fp32 over PyTorch on zoo:digits (~10 µs against tens of µs a call). The
# two target pods time at once on the test node's 2 cores, beside the other's serving sweep: over 5 runs
# one preemption (milliseconds) in onnx-fp32's runs was enough to leave a target with no best (seen once
# in CI). 400 runs in 5 interleaved rounds take milliseconds and need many more to turn the order.
TARGET_RUNS = 400


def test_two_targets_get_a_job_each_rows_and_a_recommendation_while_an_unschedulable_third_fails_alone(
        operator, control_plane, namespace, s3_server, figure):
    """Issue 25's acceptance: a ModelOptimization with two targets runs two Jobs, status gets a row per
    target and a recommendation, `kubectl get mo` shows it; a third target whose nodeSelector no node has
    ends Failed with the scheduler's message once MLOPT_WAIT_UNSCHEDULABLE_SECONDS (30 s here) has passed,
    while the other two succeed. Every worker pod is released once its target's outcome is recorded. Each
    target's run is stored in S3 under <output>/targets/<name>/ with its serving layout, whose
    InferenceService places the server where that target measured."""
    deployment = ("deployment/mlopt-operator", "-n", OPERATOR_NS)
    control_plane.kubectl("set", "env", *deployment, "MLOPT_WAIT_UNSCHEDULABLE_SECONDS=30")
    operator.wait_ready()
    try:
        name = "pools"
        output, storage = _s3_output(control_plane, namespace, s3_server, name)
        apply(control_plane, namespace, digits(name, targets=TARGETS, demand=20, output=output, storage=storage,
                                               benchmark={"warmup": 10, "runs": TARGET_RUNS, "serving": QUICK_SWEEP}))
        started = time.monotonic()
        wait_for("a Job per target", lambda: len(jobs(control_plane, namespace, name)) == 3, 60, operator.tail)
        made = {j["metadata"]["labels"]["mlopt.io/target"]: j for j in jobs(control_plane, namespace, name)}
        assert sorted(j["metadata"]["name"] for j in made.values()) == [f"{name}-g1-large", f"{name}-g1-nowhere",
                                                                        f"{name}-g1-small"]
        for target in TARGETS:
            (container,) = made[target["name"]]["spec"]["template"]["spec"]["containers"]
            assert {"name": "MLOPT_TARGET", "value": target["name"]} in container["env"]
            if "resources" in target:
                assert container["resources"]["limits"] == target["resources"]["limits"]
        assert made["nowhere"]["spec"]["template"]["spec"]["nodeSelector"] == {"mlopt.io/pool": "no-such-pool"}

        status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"),
                             timeout=600)["status"]
        took = time.monotonic() - started
        assert status["phase"] == "Succeeded", status
        rows = {row["name"]: row for row in status["targets"]}
        assert [row["name"] for row in status["targets"]] == ["large", "small", "nowhere"]
        for target in ("large", "small"):
            row = rows[target]
            assert row["phase"] == "Succeeded" and row["node"] == control_plane.node_name, row
            assert row["jobName"] == f"{name}-g1-{target}" and row.get("best"), row
            assert row["serving"]["requestsPerSecond"] > 0 and row["serving"]["p99Ms"] <= 1000, row
            assert row["costPerMillion"] > 0 and row["replicas"] >= 1 and row["costPerHour"] > 0, row
            assert row["output"] == f"{output}targets/{target}/", row
            prefix = row["output"].removeprefix("s3://results/")
            stored = {key.removeprefix(prefix): path for key, path in s3_server.objects("results").items()
                      if key.startswith(prefix)}
            manifest = _stored_serving_layout(stored, row["output"])
            predictor = manifest["spec"]["predictor"]
            # placed like that target's Job (less the Job's scratch: a server needs none)
            (container,) = made[target]["spec"]["template"]["spec"]["containers"]
            job_requests = {k: v for k, v in container["resources"]["requests"].items() if k != "ephemeral-storage"}
            assert predictor["model"]["resources"] == {"requests": job_requests,
                                                       "limits": container["resources"]["limits"]}, predictor
            assert predictor["minReplicas"] == row["replicas"], (predictor, row)
        nowhere = rows["nowhere"]
        assert (nowhere["phase"], nowhere["reason"]) == ("Failed", "Unschedulable"), nowhere
        assert "didn't match Pod's node affinity/selector" in nowhere["message"], nowhere
        assert "limit is 30 s" in nowhere["message"], nowhere
        wait_for("the unschedulable target's Job to be deleted",
                 lambda: f"{name}-g1-nowhere" not in {j["metadata"]["name"] for j in jobs(control_plane, namespace, name)},
                 60)

        recommendation = status["recommendation"]
        assert recommendation["target"] in ("large", "small") and recommendation["basis"] == "cost per hour at the demand"
        assert status["recommended"] == f"{recommendation['target']}/{recommendation['variant']}"
        assert status["best"] == rows[recommendation["target"]]["best"]  # the top-level columns are the winner's
        assert "failed: nowhere (Unschedulable)" in status["message"], status["message"]

        table = control_plane.kubectl("get", "mo", name, "-n", namespace).stdout
        header, row = table.splitlines()[:2]
        assert "RECOMMENDED" in header.split() and status["recommended"] in row.split(), table
        print(table)

        def none_held():
            return all("mlopt.io/summary" not in (p["metadata"].get("finalizers") or [])
                       for p in pods(control_plane, namespace, name))

        wait_for("every worker pod released", none_held, 60, operator.tail)
        figure(f"targets: 2 of 3 targets measured in {took:.0f} s, recommended {status['recommended']} "
               f"({rows[recommendation['target']]['serving']['requestsPerSecond']:.0f} requests/s per pod); "
               f"nowhere: {nowhere['message'][:100]}")
    finally:
        control_plane.kubectl("set", "env", *deployment, "MLOPT_WAIT_UNSCHEDULABLE_SECONDS=600")
        operator.wait_ready()
