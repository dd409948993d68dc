"""The operator on the real cluster (tests/e2e/control_plane.py: kubelet, containerd, runc), with kubectl.

The operator runs exactly as a user installs it on kind: `kubectl apply -k manifests/overlays/kind`,
the Deployment from the operator image under its own service account with only the RBAC in
manifests/base; every Job pod runs the worker image. Both images come from the Dockerfile
(tools/build-images.sh). Most cases use the small digits model with one variant; only
examples/crnn.yaml runs the CRNN.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from .control_plane import WORKER_IMAGE, free_port

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

    def pod(self) -> dict:
        pods = self.cp.kubectl_json("get", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=mlopt-operator")
        return max(pods["items"], key=lambda p: p["metadata"]["creationTimestamp"])

    def wait_ready(self, timeout: float = 240) -> None:
        # Returns once the new replica is available, i.e. Ready (the Deployment has no minReadySeconds).
        self.cp.kubectl("rollout", "status", "deployment/mlopt-operator", "-n", OPERATOR_NS, f"--timeout={timeout}s",
                        timeout=timeout + 30)

    def crash(self) -> None:
        """SIGKILL to the operator's process in its container: no chance to clean up."""
        (status,) = self.pod()["status"]["containerStatuses"]
        self.restarts = status["restartCount"]
        self.cp.node.ctr("tasks", "kill", "-s", "SIGKILL", status["containerID"].removeprefix("containerd://"))

    def wait_restarted(self, timeout: float = 240) -> None:
        def restarted():
            (status,) = self.pod()["status"]["containerStatuses"]
            return status["restartCount"] > self.restarts and status.get("ready")

        wait_for("the operator container to restart", restarted, timeout, self.tail)

    def tail(self, lines: int = 60) -> str:
        result = self.cp.kubectl("logs", "-n", OPERATOR_NS, "deployment/mlopt-operator", f"--tail={lines}",
                                 check=False)
        return result.stdout + result.stderr

    def logs(self) -> str:
        return self.cp.kubectl("logs", "-n", OPERATOR_NS, "deployment/mlopt-operator").stdout


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
    for verb, resource in (("get", "secrets"), ("create", "pods"), ("delete", "modeloptimizations.mlopt.io"),
                           ("list", "customresourcedefinitions"), ("update", "jobs.batch")):
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
    assert header.split() == ["NAME", "PHASE", "BEST", "SIZE", "LATENCY", "SPEEDUP", "AGE"]
    assert re.search(r"^crnn\s+Succeeded\s+\S+\s+[\d.]+ [kM]B\s+[\d.]+ ms\s+[\d.]+x\s+\S+$", row), table
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
    apply(control_plane, namespace, digits(name, benchmark={"warmup": 1, "runs": 10_000_000}))
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
    apply(control_plane, namespace, digits(name, benchmark={"warmup": 1, "runs": 10_000_000}))
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


def test_missing_image_with_pull_policy_never_fails_with_the_reason(operator, control_plane, namespace):
    name = "no-image"
    apply(control_plane, namespace, digits(name, job={"image": "docker.io/mlopt/worker:not-built"}))
    status = wait_status(control_plane, operator, namespace, name, phase_is("Succeeded", "Failed"),
                         timeout=120)["status"]  # the Job's deadline is 3600 s: this is not it
    assert status["phase"] == "Failed" and status["reason"] == "ErrImageNeverPull", status
    assert "mlopt/worker:not-built" in status["message"] and "imagePullPolicy is Never" in status["message"]
    wait_for("the Job to be deleted", lambda: not jobs(control_plane, namespace, name), 60)


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
    apply(control_plane, namespace, digits(name, benchmark={"warmup": 1, "runs": 10_000_000},
                                           job={"activeDeadlineSeconds": 8}))
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
    apply(control_plane, namespace, digits(name, benchmark={"warmup": 1, "runs": 10_000_000}))
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
    apply(control_plane, namespace, digits(name, benchmark={"warmup": 1, "runs": 10_000_000}))
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
    credentials = [f"--from-literal={k}={v}" for k, v in s3_server.credentials().items()]
    control_plane.kubectl("create", "secret", "generic", "s3-creds", "-n", namespace, *credentials, check=False)
    output = f"s3://{s3_server.bucket('results')}/{namespace}/{name}/"
    spec = digits(name, model={"source": f"s3://models/{namespace}/{name}.onnx",
                               "inputs": [{"name": "x", "shape": [1, 256], "dynamicAxes": {0: "batch"}}]},
                  variants=[{"name": "onnx-fp32", "recipe": "onnx-fp32"},
                            {"name": "int8", "recipe": "ort-int8-dynamic"}],
                  output=output, storage={"secretRef": "s3-creds", "endpoint": s3_server.endpoint},
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
    uploaded = lambda: [k for k in s3_server.objects("results") if k.startswith(prefix)]  # noqa: E731
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
    _onnx_model(volume / "in" / "model.onnx", hidden=256)
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
                  output="pvc://models/out/", benchmark={"warmup": 5, "runs": 40})
    apply(control_plane, namespace, spec)
    try:
        status = wait_status(control_plane, operator, namespace, "from-pvc", phase_is("Succeeded", "Failed"))["status"]
        assert status["phase"] == "Succeeded", status
        assert status["output"] == "pvc://models/out/" and status["results"] == "pvc://models/out/results.json"
        results = json.loads((volume / "out" / "results.json").read_text())
        assert results["best"] == status.get("best")  # None (no key in status) when nothing beat the baseline
        for stored in results["outputs"]:  # the whole run is on the volume, byte for byte
            on_volume = volume / "out" / stored["path"]
            assert hashlib.sha256(on_volume.read_bytes()).hexdigest() == stored["sha256"], stored["path"]
        assert any(o["path"].startswith("models/") for o in results["outputs"]), results["outputs"]
        if results["best"] in (None, results["baseline"]["name"]):  # timing kept the user's own model: nothing to ship
            assert "artifacts" not in status, status
        else:
            best = status["artifacts"]["best"]
            assert best["uri"].startswith("pvc://models/out/models/"), best
            on_volume = volume / best["uri"].removeprefix("pvc://models/")
            assert on_volume.is_file() and hashlib.sha256(on_volume.read_bytes()).hexdigest() == best["sha256"]
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False,
                              timeout=150)
        control_plane.kubectl("delete", "pv", pv_name, "--wait=false", check=False)
