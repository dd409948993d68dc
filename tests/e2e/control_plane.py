"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager and the
test node (tests/e2e/testnode.py), started as local processes on free ports.

Used by the pytest fixtures in tests/e2e/conftest.py and by scripts/cluster-up:

    with ControlPlane(workdir).start() as cp:
        cp.kubectl("get", "nodes")
        ns = cp.create_namespace("demo")

Binaries come from tools/build-control-plane.sh (built from Go modules, cached per version), or from
MLOPT_K8S_BIN_DIR if set. Every process runs in its own process group and is killed by PID in stop().
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import testnode

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tools" / "build-control-plane.sh"
TESTNODE_SCRIPT = Path(testnode.__file__).resolve()
NODE_NAME = "mlopt-test-node"
SERVICE_CIDR = "10.0.0.0/24"
KCM_CONTROLLERS = [
    "job-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",  # kube-root-ca.crt, used by projected SA volumes
    "ttl-after-finished-controller",
]
# No node-lifecycle/taint-eviction controllers: the test node sends no heartbeats and would be
# marked NotReady and its pods evicted. No scheduler: the test node binds pods itself.


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started; the message says what is missing."""


# --------------------------------------------------------------------------------------------------
# Binaries


def build_binaries(log_file: Path) -> Path:
    """Build (or find cached) etcd/kube-apiserver/kube-controller-manager; return their directory."""
    if os.environ.get("MLOPT_K8S_BIN_DIR"):
        return Path(os.environ["MLOPT_K8S_BIN_DIR"])
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=log, text=True)
    if result.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise ControlPlaneError(
            f"{BUILD_SCRIPT} failed (exit {result.returncode}); it needs the Go toolchain (>= 1.26) and "
            f"the Go module proxy. Last lines of {log_file}:\n{tail}"
        )
    return Path(result.stdout.strip().splitlines()[-1])


def find_kubectl(bin_dir: Path) -> str:
    for candidate in (os.environ.get("MLOPT_KUBECTL"), str(bin_dir / "kubectl"), "kubectl"):
        if candidate and (found := shutil.which(candidate)):
            return found
    raise ControlPlaneError("kubectl not found: put it on PATH or set MLOPT_KUBECTL")




# --------------------------------------------------------------------------------------------------
# Throw-away PKI (cryptography): CA, API server serving cert, admin client cert, SA signing key.


@dataclass
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path


def make_pki(directory: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew

    def name(cn: str, org: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    def write_key(key, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    def issue(subject, key, issuer, issuer_key, *, ca: bool, usage=None, sans=None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False), critical=True)
        return builder.sign(issuer_key, hashes.SHA256())

    def write_cert(cert, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("mlopt-test-ca")
    ca = issue(ca_name, ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(d) for d in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                      "kubernetes.default.svc.cluster.local")]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "10.0.0.1")]
    server = issue(name("kube-apiserver"), server_key, ca_name, ca_key, ca=False,
                   usage=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans)
    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin = issue(name("mlopt-admin", "system:masters"), admin_key, ca_name, ca_key, ca=False,
                  usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    # Service-account tokens are signed with RSA (RS256 is what every client library verifies).
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    pki = Pki(directory / "ca.crt", directory / "apiserver.crt", directory / "apiserver.key",
              directory / "admin.crt", directory / "admin.key", directory / "sa.key", directory / "sa.pub")
    write_cert(ca, pki.ca_cert)
    write_cert(server, pki.server_cert)
    write_key(server_key, pki.server_key)
    write_cert(admin, pki.admin_cert)
    write_key(admin_key, pki.admin_key)
    write_key(sa_key, pki.sa_key)
    pki.sa_pub.write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    return pki


def kubeconfig_dict(server: str, pki: Pki, user: str = "mlopt-admin") -> dict:
    """Admin kubeconfig with the certificates embedded, so it can be copied anywhere."""
    import base64

    b64 = lambda path: base64.b64encode(path.read_bytes()).decode()  # noqa: E731
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "mlopt-test", "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_cert)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(pki.admin_cert),
                                          "client-key-data": b64(pki.admin_key)}}],
        "contexts": [{"name": "mlopt-test", "context": {"cluster": "mlopt-test", "user": user}}],
        "current-context": "mlopt-test",
    }


# --------------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Component:
    name: str
    process: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the process group (pgid == pid, start_new_session), SIGKILL after timeout."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, so a pytest killed with SIGKILL does
    not leave a cluster running. (Linux ties this to the thread that started the child: start the
    control plane from a thread that lives as long as it, e.g. the main thread.)"""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_component(name: str, argv: list[str], log_dir: Path) -> Component:
    log = log_dir / f"{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True,  # own process group, killed by PID
                                   preexec_fn=_terminate_with_parent)
    return Component(name, process, log)


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def wait_until(what: str, check, timeout: float, components: list[Component], interval: float = 0.5):
    """Poll check() until it returns a truthy value; fail early if a component died."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for comp in components:
            if not comp.alive():
                raise ControlPlaneError(f"{comp.name} exited ({comp.process.returncode}) while waiting for "
                                        f"{what}; last lines of {comp.log}:\n{tail(comp.log)}")
        try:
            if value := check():
                return value
        except Exception as err:  # not up yet: connection refused, 403 while RBAC bootstraps, ...
            last_error = err
        time.sleep(interval)
    raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error!r})")


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return response.status == 200


# --------------------------------------------------------------------------------------------------
# The control plane


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager (+ test node) under one work directory."""

    def __init__(self, workdir: Path, bin_dir: Path | None = None, with_node: bool = True,
                 start_timeout: float = 180):
        self.workdir = Path(workdir).resolve()
        self.log_dir = self.workdir / "logs"
        self.node_dir = self.workdir / "node"
        self.kubeconfig = self.workdir / "kubeconfig"
        self._bin_dir = bin_dir
        self.with_node = with_node
        self.node_name = NODE_NAME
        self.start_timeout = start_timeout
        self.components: list[Component] = []
        self.server = ""
        self.pki: Pki | None = None
        self.api: testnode.Api | None = None
        self._kubectl = ""

    # -- lifecycle
    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = build_binaries(self.log_dir / "build.log")
        return self._bin_dir

    def start(self) -> "ControlPlane":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        missing = [b for b in ("etcd", "kube-apiserver", "kube-controller-manager") if not (self.bin_dir / b).is_file()]
        if missing:
            raise ControlPlaneError(f"missing binaries in {self.bin_dir}: {missing}")
        self._kubectl = find_kubectl(self.bin_dir)
        try:
            self.pki = make_pki(self.workdir / "pki")
            etcd_url = self._start_etcd()
            self._start_apiserver(etcd_url)
            self._start_controller_manager()
            self._wait_default_service_account("default")
            if self.with_node:
                self._start_node()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Node first (it kills its containers), then the rest in reverse start order."""
        for comp in reversed(self.components):
            comp.stop()
        self._kill_leftover_containers()
        self.components.clear()

    def __enter__(self) -> "ControlPlane":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _kill_leftover_containers(self) -> None:
        """If the test node was killed hard, its containers' process groups are listed in running/."""
        running = self.node_dir / "running"
        for entry in running.glob("*") if running.exists() else []:
            try:
                os.killpg(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
            entry.unlink(missing_ok=True)

    # -- components
    def _start_etcd(self) -> str:
        client, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        comp = start_component("etcd", [
            str(self.bin_dir / "etcd"),
            "--name=mlopt-test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=mlopt-test={peer_url}",
            "--unsafe-no-fsync=true",  # throw-away data: skip fsync, much faster on slow disks
            "--log-level=warn",
        ], self.log_dir)
        self.components.append(comp)
        wait_until("etcd /readyz", lambda: http_ok(f"{client_url}/readyz"), self.start_timeout, self.components)
        return client_url

    def _start_apiserver(self, etcd_url: str) -> None:
        pki, port = self.pki, free_port()
        self.server = f"https://127.0.0.1:{port}"
        comp = start_component("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
            # Endpoints validation rejects loopback IPs, so the `kubernetes` Service gets none.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.workdir / 'pki'}",
            f"--tls-cert-file={pki.server_cert}", f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",  # so the operator's RBAC manifests are really exercised
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",  # less CPU on small CI machines
            "--profiling=false",
        ], self.log_dir)
        self.components.append(comp)
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        wait_until("kube-apiserver /readyz", lambda: http_ok(f"{self.server}/readyz", context),
                   self.start_timeout, self.components)
        self.kubeconfig.write_text(json.dumps(kubeconfig_dict(self.server, pki), indent=1))
        self.kubeconfig.chmod(0o600)
        self.api = testnode.Api(self.server, str(pki.ca_cert), str(pki.admin_cert), str(pki.admin_key))

    def _start_controller_manager(self) -> None:
        comp = start_component("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            f"--controllers={','.join(KCM_CONTROLLERS)}",
            f"--root-ca-file={self.pki.ca_cert}",
            f"--service-account-private-key-file={self.pki.sa_key}",
            "--secure-port=0",  # no metrics/health endpoint: readiness is the default SA appearing
        ], self.log_dir)
        self.components.append(comp)

    def _start_node(self) -> None:
        argv = [sys.executable, str(TESTNODE_SCRIPT), "run",
                f"--server={self.server}", f"--ca-file={self.pki.ca_cert}",
                f"--cert-file={self.pki.admin_cert}", f"--key-file={self.pki.admin_key}",
                f"--name={self.node_name}", f"--workdir={self.node_dir}"]
        if sys.prefix != sys.base_prefix:  # running from a venv: containers run the project's code
            argv.append(f"--path-prepend={Path(sys.prefix) / 'bin'}")
        self.components.append(start_component("testnode", argv, self.log_dir))
        wait_until(f"node {self.node_name} Ready", self._node_ready, self.start_timeout, self.components)

    def _node_ready(self) -> bool:
        node = self.api.get_or_none(f"/api/v1/nodes/{self.node_name}")
        conditions = (node or {}).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _wait_default_service_account(self, namespace: str) -> None:
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/default"
        wait_until(f"serviceaccount default in {namespace}", lambda: self.api.get_or_none(path),
                   self.start_timeout, self.components)

    # -- helpers for tests and scripts
    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [self._kubectl, f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def kubectl_json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def create_namespace(self, prefix: str = "test") -> str:
        """A fresh namespace whose `default` service account exists (pods can be admitted)."""
        name = f"{prefix}-{secrets.token_hex(3)}"
        self.api.request("POST", "/api/v1/namespaces",
                         {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        self._wait_default_service_account(name)
        return name

    def delete_namespace(self, name: str, wait: bool = False, timeout: float = 120) -> None:
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{name}")
        except testnode.ApiError as err:
            if err.status != 404:
                raise
        if wait:
            wait_until(f"namespace {name} gone", lambda: self.api.get_or_none(f"/api/v1/namespaces/{name}") is None,
                       timeout, self.components)

    def log_tails(self, lines: int = 40) -> str:
        parts = [f"----- {c.name} ({c.log}) -----\n{tail(c.log, lines)}" for c in self.components]
        logs = (self.node_dir / "logs").glob("*.log") if self.node_dir.exists() else []
        recent = sorted(logs, key=lambda log: log.stat().st_mtime)[-5:]  # the failing test's, most likely
        parts += [f"----- container {log.name} -----\n{tail(log, lines)}" for log in recent]
        return "\n".join(parts)

    def container_log(self, namespace: str, pod: str, container: str) -> str:
        """What `kubectl logs` would show (the test node does not serve the logs API)."""
        return (self.node_dir / "logs" / f"{namespace}_{pod}_{container}.log").read_text(errors="replace")
