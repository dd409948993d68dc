"""Kueue (sigs.k8s.io/kueue) in the e2e cluster: its CRDs and its controller manager, a host process
with the admin kubeconfig like the other control-plane components, and the queues the tests use.

Built by tools/build-kueue.sh (the manager and the CRDs of the same module version, cached), or
taken from MLOPT_KUEUE_DIR (a folder holding `kueue` and `crd/`). Started on first use
(`ControlPlane.start_kueue()`, the `kueue` fixture), so tests that do not need it do not pay for it.

How it runs, from the module's own cmd/kueue/main.go and apis/config/v1beta2:
- `--config` with a v1beta2 Configuration: integrations `batch/job` only,
  `manageJobsWithoutQueueName: false` (Kueue manages only Jobs with `kueue.x-k8s.io/queue-name`),
  no leader election, the visibility API server off (feature gate `VisibilityOnDemand`).
- Internal cert management off. No webhook configuration is registered with the API server (the
  operator creates its Jobs suspended and labelled, which is what Kueue's Job webhook would ensure),
  but the manager still serves its webhooks and refuses to start without a serving pair: a
  self-signed one goes into its `webhook.certDir` on 127.0.0.1.
- With internal cert management off, main.go reads the metrics serving pair from the fixed path
  /etc/kueue/metrics/certs (not configurable): the same self-signed pair is written there, and that
  host path is removed again on stop (`leftovers()` reports it otherwise), like the node's paths.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
from pathlib import Path

from .control_plane import REPO_ROOT, Component, ControlPlaneError, _cached_build, free_port, http_ok, start_component, wait_until

BUILD_SCRIPT = REPO_ROOT / "tools" / "build-kueue.sh"
METRICS_CERT_ROOT = Path("/etc/kueue")  # main.go: /etc/kueue/metrics/certs when internal certs are off
METRICS_CERT_DIR = METRICS_CERT_ROOT / "metrics" / "certs"
API = "kueue.x-k8s.io/v1beta2"
FLAVOR = "mlopt-e2e-flavor"
CLUSTER_QUEUE = "mlopt-e2e"
# One worker Job fits: a worker requests 1 CPU by default (spec.job.resources.requests.cpu). Memory and
# ephemeral storage are covered generously, so CPU alone decides (a resource a ClusterQueue does not
# cover makes every Workload that requests it inadmissible).
CPU_QUOTA = "1"
OTHER_QUOTAS = {"memory": "64Gi", "ephemeral-storage": "200Gi"}


def build_kueue(log_file: Path) -> Path:
    """The folder with Kueue's manager (`kueue`) and CRDs (`crd/`), built from the Go module (cached)."""
    return _cached_build(BUILD_SCRIPT, "MLOPT_KUEUE_DIR", log_file, "the Go toolchain (>= 1.26) and the Go module proxy")


def self_signed_pair(directory: Path) -> None:
    """tls.crt / tls.key for 127.0.0.1 and localhost (controller-runtime's file names)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kueue-e2e")])
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (directory / "tls.key").chmod(0o600)


class Kueue:
    """Kueue's CRDs and controller manager on a running ControlPlane."""

    def __init__(self, plane, workdir: Path, start_timeout: float = 180):
        self.plane, self.workdir, self.start_timeout = plane, Path(workdir), start_timeout
        self.component: Component | None = None
        self._made_cert_root = False

    def start(self) -> "Kueue":
        self.workdir.mkdir(parents=True, exist_ok=True)
        folder = build_kueue(self.plane.log_dir / "build-kueue.log")
        binary, crds = folder / "kueue", folder / "crd"
        # Server-side: the Workload CRD is larger than the last-applied annotation may be.
        self.plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
        names = [f"crd/{path.stem.split('_', 1)[1]}.{path.stem.split('_', 1)[0]}" for path in sorted(crds.glob("*.yaml"))]
        self.plane.kubectl("wait", "--for=condition=Established", *names, "--timeout=60s")
        self._metrics_certs()
        webhook_certs = self.workdir / "webhook-certs"
        self_signed_pair(webhook_certs)
        health = free_port()
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "manageJobsWithoutQueueName": False,
            "internalCertManagement": {"enable": False},
            "leaderElection": {"leaderElect": False},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
            "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
            "webhook": {"host": "127.0.0.1", "port": free_port(), "certDir": str(webhook_certs)},
            "featureGates": {"VisibilityOnDemand": False},
            "integrations": {"frameworks": ["batch/job"]},
        }
        config_file = self.workdir / "config.yaml"
        config_file.write_text(json.dumps(config, indent=1))  # JSON is YAML
        self.component = start_component("kueue", [
            str(binary), f"--config={config_file}", f"--kubeconfig={self.plane.kubeconfig}",
        ], self.plane.log_dir)
        wait_until("kueue /readyz", lambda: http_ok(f"http://127.0.0.1:{health}/readyz"), self.start_timeout,
                   [*self.plane.components, self.component])
        return self

    def _metrics_certs(self) -> None:
        ours = {METRICS_CERT_DIR / "tls.crt", METRICS_CERT_DIR / "tls.key"}
        if METRICS_CERT_ROOT.exists():
            others = [p for p in METRICS_CERT_ROOT.rglob("*") if p.is_file() and p not in ours]
            if others:
                raise ControlPlaneError(f"{METRICS_CERT_ROOT} holds files the e2e cluster did not write ({others[:3]}): "
                                   "a Kueue installed on this machine? Move it away first.")
        self_signed_pair(METRICS_CERT_DIR)
        self._made_cert_root = True

    def stop(self) -> None:
        if self.component is not None:
            self.component.stop()
            self.component = None
        if self._made_cert_root:
            shutil.rmtree(METRICS_CERT_ROOT, ignore_errors=True)
            self._made_cert_root = False

    def leftovers(self) -> list[str]:
        return [f"path {METRICS_CERT_ROOT}"] if METRICS_CERT_ROOT.exists() else []

    # -- the queues the tests use
    def ensure_cluster_queue(self) -> str:
        """A ResourceFlavor and a ClusterQueue with room for exactly one worker Job (CPU), open to
        every namespace; returns the ClusterQueue's name."""
        quotas = {"cpu": CPU_QUOTA, **OTHER_QUOTAS}
        documents = [
            {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
            {"apiVersion": API, "kind": "ClusterQueue", "metadata": {"name": CLUSTER_QUEUE},
             "spec": {"namespaceSelector": {},
                      "resourceGroups": [{"coveredResources": list(quotas),
                                          "flavors": [{"name": FLAVOR, "resources": [
                                              {"name": name, "nominalQuota": value} for name, value in quotas.items()]}]}]}},
        ]
        for document in documents:
            self.plane.kubectl("apply", "-f", "-", input=json.dumps(document))
        self.plane.kubectl("wait", "--for=condition=Active", f"clusterqueue/{CLUSTER_QUEUE}", "--timeout=60s")
        return CLUSTER_QUEUE

    def local_queue(self, namespace: str, name: str) -> str:
        """A LocalQueue in `namespace` that feeds the ClusterQueue; returns its name."""
        cluster_queue = self.ensure_cluster_queue()
        document = {"apiVersion": API, "kind": "LocalQueue", "metadata": {"name": name, "namespace": namespace},
                    "spec": {"clusterQueue": cluster_queue}}
        self.plane.kubectl("apply", "-f", "-", input=json.dumps(document))
        self.plane.kubectl("wait", "--for=condition=Active", f"localqueue/{name}", "-n", namespace, "--timeout=60s")
        return name
