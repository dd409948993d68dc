"""A real Kubernetes cluster for tests: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
and a real node (tests/e2e/node.py: containerd + runc, the kubelet, kube-proxy), started as local
processes on free ports, running the images of tools/build-images.sh.

Used by the pytest fixtures in tests/e2e/conftest.py and by scripts/cluster-up:

    with ControlPlane(workdir).start() as cp:
        cp.kubectl("get", "nodes")
        ns = cp.create_namespace("demo")

Binaries come from tools/build-control-plane.sh (built from Go modules, cached per version), or from
MLOPT_K8S_BIN_DIR if set; images from tools/build-images.sh, or MLOPT_IMAGES_DIR. Every process runs
in its own process group and is killed by PID in stop().
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .node import NODE_IP, Node, NodeError

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tools" / "build-control-plane.sh"
IMAGES_SCRIPT = REPO_ROOT / "tools" / "build-images.sh"
NODE_NAME = "mlopt-node"
SERVICE_CIDR = "10.0.0.0/24"
# The images the node imports: the base (small, for plain test pods) and the two the Dockerfile builds.
BASE_IMAGE = "localhost/mlopt/base:bookworm-py3.11"
OPERATOR_IMAGE = "docker.io/mlopt/operator:0.1.0"
WORKER_IMAGE = "docker.io/mlopt/worker:0.1.0"
KCM_CONTROLLERS = [
    "job-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",  # kube-root-ca.crt, used by projected SA volumes
    "ttl-after-finished-controller",
    "deployment-controller",
    "replicaset-controller",
    "endpoints-controller",
    "endpointslice-controller",  # kube-proxy routes the `kubernetes` Service from its EndpointSlice
    "endpointslice-mirroring-controller",
    "persistentvolume-binder-controller",  # pvc:// tests bind a claim to a local PersistentVolume
    "persistentvolumeclaim-protection-controller",  # lift the finalizers admission puts on claims and
    "persistentvolume-protection-controller",  # volumes, or deleting their namespace never ends
    "pod-garbage-collector-controller",
    "node-lifecycle-controller",  # lifts the not-ready taint the kubelet registers with (and sets it again)
]


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started; the message says what is missing."""


# --------------------------------------------------------------------------------------------------
# Binaries


def _cached_build(script: Path, env_override: str, log_file: Path, needs: str) -> Path:
    """Run a tools/ build script (it returns at once when its cache is current); return the folder it
    prints last. `env_override` names a variable that points at a prepared folder instead."""
    if os.environ.get(env_override):
        return Path(os.environ[env_override])
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        result = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, stderr=log, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"{script} failed (exit {result.returncode}); it needs {needs}. "
                                f"Last lines of {log_file}:\n{tail(log_file, 30)}")
    return Path(result.stdout.strip().splitlines()[-1])


def build_binaries(log_file: Path) -> Path:
    """etcd, the Kubernetes components and containerd, built from Go modules (cached)."""
    return _cached_build(BUILD_SCRIPT, "MLOPT_K8S_BIN_DIR", log_file, "the Go toolchain (>= 1.26) and the Go module proxy")


def build_images(log_file: Path) -> Path:
    """The base, pause, operator and worker images as archives (cached)."""
    return _cached_build(IMAGES_SCRIPT, "MLOPT_IMAGES_DIR", log_file,
                         "root, buildah and debootstrap (scripts/node-packages) and PyPI")


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
    node_cert: Path
    node_key: Path
    proxy_cert: Path
    proxy_key: Path


def make_pki(directory: Path, node_name: str = NODE_NAME) -> Pki:
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
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "10.0.0.1", NODE_IP)]
    server = issue(name("kube-apiserver"), server_key, ca_name, ca_key, ca=False,
                   usage=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans)
    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin = issue(name("mlopt-admin", "system:masters"), admin_key, ca_name, ca_key, ca=False,
                  usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    # The kubelet's identity for the Node authorizer, and kube-proxy's (bound by the default RBAC).
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = issue(name(f"system:node:{node_name}", "system:nodes"), node_key, ca_name, ca_key, ca=False,
                 usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    proxy_key = ec.generate_private_key(ec.SECP256R1())
    proxy = issue(name("system:kube-proxy", "system:node-proxier"), proxy_key, ca_name, ca_key, ca=False,
                  usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    # Service-account tokens are signed with RSA (RS256 is what every client library verifies).
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    pki = Pki(directory / "ca.crt", directory / "apiserver.crt", directory / "apiserver.key",
              directory / "admin.crt", directory / "admin.key", directory / "sa.key", directory / "sa.pub",
              directory / "node.crt", directory / "node.key", directory / "proxy.crt", directory / "proxy.key")
    write_cert(ca, pki.ca_cert)
    write_cert(server, pki.server_cert)
    write_key(server_key, pki.server_key)
    write_cert(admin, pki.admin_cert)
    write_key(admin_key, pki.admin_key)
    write_key(sa_key, pki.sa_key)
    write_cert(node, pki.node_cert)
    write_key(node_key, pki.node_key)
    write_cert(proxy, pki.proxy_cert)
    write_key(proxy_key, pki.proxy_key)
    pki.sa_pub.write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    return pki


def kubeconfig_dict(server: str, pki: Pki, user: str = "mlopt-admin", cert: Path | None = None,
                    key: Path | None = None) -> dict:
    """A kubeconfig (admin unless another cert is given) with the certificates embedded."""
    import base64

    b64 = lambda path: base64.b64encode(path.read_bytes()).decode()  # noqa: E731
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "mlopt-test", "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_cert)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert or pki.admin_cert),
                                          "client-key-data": b64(key or pki.admin_key)}}],
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


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status


class Api:
    """A minimal JSON client for the API server with the admin certificate (no kubectl round trip)."""

    def __init__(self, server: str, ca_file: str, cert_file: str, key_file: str):
        url = urllib.parse.urlsplit(server)
        self.host, self.port = url.hostname, url.port or 443
        self.context = ssl.create_default_context(cafile=ca_file)
        self.context.load_cert_chain(cert_file, key_file)

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=30)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                           "Accept": "application/json"})
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        if response.status >= 300:
            raise ApiError(response.status, text)
        return json.loads(text) if text else {}

    def get_or_none(self, path: str) -> dict | None:
        try:
            return self.request("GET", path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise


# --------------------------------------------------------------------------------------------------
# The cluster


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler, and a real node, under one
    work directory."""

    def __init__(self, workdir: Path, bin_dir: Path | None = None, images_dir: Path | None = None,
                 with_node: bool = True, start_timeout: float = 180):
        self.workdir = Path(workdir).resolve()
        self.log_dir = self.workdir / "logs"
        self.kubeconfig = self.workdir / "kubeconfig"
        self._bin_dir = bin_dir
        self._images_dir = images_dir
        self.with_node = with_node
        self.node_name = NODE_NAME
        self.start_timeout = start_timeout
        self.components: list[Component] = []
        self.node: Node | None = None
        self.kueue = None  # tests/e2e/kueue.py's Kueue, once start_kueue() ran
        self.left_behind: list[str] = []  # what the last stop() could not remove (see Node.leftovers)
        self.server = ""
        self.pki: Pki | None = None
        self.api: Api | None = None
        self._kubectl = ""

    # -- lifecycle
    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = build_binaries(self.log_dir / "build.log")
        return self._bin_dir

    @property
    def images_dir(self) -> Path:
        if self._images_dir is None:
            self._images_dir = build_images(self.log_dir / "build-images.log")
        return self._images_dir

    def start(self) -> "ControlPlane":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        wanted = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]
        if self.with_node:
            wanted += ["kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr"]
        missing = [b for b in wanted if not (self.bin_dir / b).is_file()]
        if missing:
            raise ControlPlaneError(f"missing binaries in {self.bin_dir}: {missing} (run {BUILD_SCRIPT})")
        self._kubectl = find_kubectl(self.bin_dir)
        try:
            if self.with_node:
                self.node = Node(self.workdir / "node", self.bin_dir, self.images_dir, self.node_name)
                self.node.prepare()  # the node's address exists before the API server binds to it
            self.pki = make_pki(self.workdir / "pki", self.node_name)
            etcd_url = self._start_etcd()
            self._start_apiserver(etcd_url)
            self._start_controller_manager()
            self._start_scheduler()
            self._wait_default_service_account("default")
            if self.with_node:
                self._start_node()
        except NodeError as err:
            self.stop()
            raise ControlPlaneError(str(err)) from None
        except BaseException:
            self.stop()
            raise
        return self

    def start_kueue(self):
        """Kueue's CRDs and controller manager (tests/e2e/kueue.py), started once, on first use; stop()
        ends it first."""
        if self.kueue is None:
            from .kueue import Kueue

            kueue = Kueue(self, self.workdir / "kueue", self.start_timeout)
            try:
                kueue.start()
            except BaseException:
                kueue.stop()
                raise
            self.kueue = kueue
        return self.kueue

    def stop(self) -> None:
        """Kueue, then the node (its pods, then its processes and what they left), then the control plane."""
        if self.kueue is not None:  # before the node: nothing may admit a Job while the pods go
            self.kueue.stop()
            kueue_left, self.kueue = self.kueue.leftovers(), None
        else:
            kueue_left = []
        if self.node is not None:
            # No controller may replace the pods the node is about to delete (a Deployment's would).
            for comp in self.components:
                if comp.name in ("kube-controller-manager", "kube-scheduler"):
                    comp.stop()
            try:
                self.node.stop(self.api if self._apiserver_alive() else None)
                self.left_behind = self.node.leftovers()
            finally:
                self.node = None
        self.left_behind += kueue_left
        for comp in reversed(self.components):
            comp.stop()
        self.components.clear()

    def _apiserver_alive(self) -> bool:
        return self.api is not None and any(c.name == "kube-apiserver" and c.alive() for c in self.components)

    def __enter__(self) -> "ControlPlane":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

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
        # On the node's address (when there is a node): the kubelet's iptables rules drop traffic from
        # pods to 127.0.0.0/8, and the `kubernetes` Service needs an endpoint that is not loopback.
        address = NODE_IP if self.with_node else "127.0.0.1"
        self.server = f"https://{address}:{port}"
        argv = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            f"--bind-address={address}", f"--advertise-address={address}", f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'pki'}",
            f"--tls-cert-file={pki.server_cert}", f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # RBAC so the operator's manifests are really exercised; Node + NodeRestriction for the kubelet.
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            # `kubectl logs/exec` go API server -> kubelet with this client identity.
            f"--kubelet-client-certificate={pki.admin_cert}", f"--kubelet-client-key={pki.admin_key}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",  # less CPU on small CI machines
            "--profiling=false",
        ]
        if not self.with_node:  # Endpoints validation rejects loopback IPs
            argv.append("--endpoint-reconciler-type=none")
        self._apiserver_argv = argv
        comp = start_component("kube-apiserver", argv, self.log_dir)
        self.components.append(comp)
        self._wait_apiserver_ready()
        self.kubeconfig.write_text(json.dumps(kubeconfig_dict(self.server, pki), indent=1))
        self.kubeconfig.chmod(0o600)
        self.api = Api(self.server, str(pki.ca_cert), str(pki.admin_cert), str(pki.admin_key))

    def _wait_apiserver_ready(self) -> None:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        wait_until("kube-apiserver /readyz", lambda: http_ok(f"{self.server}/readyz", context),
                   self.start_timeout, self.components)

    def restart_apiserver(self, down_seconds: float = 3.0) -> None:
        """Stop the kube-apiserver (SIGTERM), leave it down a moment, start it again on the same address:
        what a control-plane upgrade or a crash looks like to the clients."""
        index = next(i for i, c in enumerate(self.components) if c.name == "kube-apiserver")
        self.components[index].stop()
        time.sleep(down_seconds)
        self.components[index] = start_component("kube-apiserver", self._apiserver_argv, self.log_dir)
        self._wait_apiserver_ready()

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

    def _start_scheduler(self) -> None:
        self.components.append(start_component("kube-scheduler", [
            str(self.bin_dir / "kube-scheduler"),
            f"--kubeconfig={self.kubeconfig}", f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
        ], self.log_dir))

    def _start_node(self) -> None:
        def identity(name: str, cert: Path, key: Path) -> Path:
            path = self.workdir / f"{name}.kubeconfig"
            path.write_text(json.dumps(kubeconfig_dict(self.server, self.pki, name, cert, key)))
            path.chmod(0o600)
            return path

        self.node.start(
            start_component=start_component, wait_until=wait_until, server=self.server, ca_file=self.pki.ca_cert,
            node_kubeconfig=identity("kubelet", self.pki.node_cert, self.pki.node_key),
            proxy_kubeconfig=identity("kube-proxy", self.pki.proxy_cert, self.pki.proxy_key),
            log_dir=self.log_dir, images=["base", "operator", "worker"], timeout=self.start_timeout,
        )
        wait_until(f"node {self.node_name} Ready and schedulable", self._node_ready, self.start_timeout,
                   self.components + self.node.components)

    def _node_ready(self) -> bool:
        """Ready, and the node-lifecycle controller has lifted the kubelet's not-ready taint."""
        node = self.api.get_or_none(f"/api/v1/nodes/{self.node_name}") or {}
        conditions = node.get("status", {}).get("conditions", [])
        taints = node.get("spec", {}).get("taints", [])
        return (any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
                and not any(t["key"].startswith("node.kubernetes.io/") for t in taints))

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

    def create_namespace(self, prefix: str = "test", labels: dict[str, str] | None = None) -> str:
        """A fresh namespace whose `default` service account exists (pods can be admitted)."""
        name = f"{prefix}-{secrets.token_hex(3)}"
        self.api.request("POST", "/api/v1/namespaces",
                         {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}})
        self._wait_default_service_account(name)
        return name

    def delete_namespace(self, name: str, wait: bool = False, timeout: float = 120) -> None:
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{name}")
        except ApiError as err:
            if err.status != 404:
                raise
        if wait:
            wait_until(f"namespace {name} gone", lambda: self.api.get_or_none(f"/api/v1/namespaces/{name}") is None,
                       timeout, self.components)

    def log_tails(self, lines: int = 40) -> str:
        components = self.components + (self.node.components if self.node else [])
        if self.kueue is not None and self.kueue.component is not None:
            components.append(self.kueue.component)
        return "\n".join(f"----- {c.name} ({c.log}) -----\n{tail(c.log, lines)}" for c in components)

    def container_log(self, namespace: str, pod: str, container: str) -> str:
        """`kubectl logs` (through the API server and the kubelet)."""
        return self.kubectl("logs", "-n", namespace, pod, "-c", container).stdout
