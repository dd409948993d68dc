"""A real node for the e2e cluster: containerd (with Debian's runc), the kubelet and kube-proxy, all
built from Go modules by tools/build-control-plane.sh, running the images of tools/build-images.sh.

The machine has no systemd and only cgroup v1, and may not lower oom_score_adj (no
CAP_SYS_RESOURCE); the settings below follow from that (shared notes: real-node.md). Networking
stays on this machine: the node's address sits on an empty bridge, pods get addresses on a second
bridge (CNI bridge + host-local, no masquerade), and nothing is routed off the machine.

`Node.prepare()` creates what must exist before the API server starts (the node's address, which
the API server binds to); `Node.start(...)` starts containerd, imports the images and starts the
kubelet and kube-proxy; `Node.stop()` removes everything again: pods, shims, mounts, links,
iptables chains, cgroups, sysctls and the host paths the kubelet and containerd insist on.

Like a real node, containerd's image store outlives the node: it sits next to the image archives
(`<images>/../containerd`), so a run imports only the archives that changed since the last one
(the worker image is ~6 GB: importing it takes minutes). Containers and sandboxes never outlive a
run; a lock keeps two nodes from sharing the store.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

NODE_BRIDGE = "mlopt-node0"  # holds the node's address (the kubelet refuses loopback addresses)
NODE_IP = "10.201.0.1"
POD_BRIDGE = "mlopt-cni0"
POD_SUBNET = "10.202.0.0/24"
CLUSTER_CIDR = "10.202.0.0/16"
PAUSE_IMAGE = "localhost/mlopt/pause:e2e"
CGROUP_ROOT = "mlopt-e2e"  # every pod's cgroup lives under this one, in each v1 hierarchy
CGROUP_FS = Path("/sys/fs/cgroup")
RUNC = "/usr/sbin/runc"
CNI_BIN = "/usr/lib/cni"
# Paths the kubelet, containerd's shims and the CNI plugins use whatever their configuration says.
HOST_PATHS = [Path("/run/containerd"), Path("/var/lib/cni"), Path("/var/lib/kubelet"), Path("/var/log/containers"),
              Path("/var/log/pods")]
# What the kubelet (and the bridge plugin's isGateway) change on the host; restored on stop.
SYSCTLS = ["kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory", "net/ipv4/ip_forward"]


class NodeError(RuntimeError):
    """The node could not be prepared or started; the message says what is missing."""


def run(*argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result


def requirements_missing() -> list[str]:
    """What this machine lacks for a real node (root, runc, CNI plugins, iptables)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (containerd and the kubelet manage mounts, cgroups and network namespaces)")
    for path in (RUNC, f"{CNI_BIN}/bridge", f"{CNI_BIN}/host-local", f"{CNI_BIN}/loopback"):
        if not Path(path).exists():
            missing.append(f"{path} (Debian packages runc, containernetworking-plugins: scripts/node-packages)")
    if not shutil.which("iptables"):
        missing.append("iptables (Debian package iptables: scripts/node-packages)")
    return missing


@dataclass
class Node:
    workdir: Path
    bin_dir: Path
    images_dir: Path
    name: str = "mlopt-node"
    components: list = field(default_factory=list)
    _sysctls: dict = field(default_factory=dict)
    _store_lock: object = None

    @property
    def containerd_socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    @property
    def store_dir(self) -> Path:
        """containerd's root (content, snapshots, metadata): kept between runs, like a node's disk."""
        return self.images_dir.parent / "containerd"

    # -- before the API server
    def prepare(self) -> None:
        missing = requirements_missing()
        if missing:
            raise NodeError("this machine cannot run the e2e node; missing: " + "; ".join(missing))
        self._lock_store()
        self._remove_leftovers()  # a previous run killed before its teardown
        for name in SYSCTLS:
            self._sysctls[name] = (Path("/proc/sys") / name).read_text().strip()
        run("ip", "link", "add", NODE_BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{NODE_IP}/32", "dev", NODE_BRIDGE)
        run("ip", "link", "set", NODE_BRIDGE, "up")
        for path in HOST_PATHS:
            path.mkdir(parents=True, exist_ok=True)
        self._make_cgroup_root()

    def _lock_store(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.store_dir / ".node.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise NodeError(f"another e2e node is running on this machine (it holds {self.store_dir}/.node.lock); "
                            "stop it first (the node's address and bridges exist once per machine)") from None
        self._store_lock = lock

    def _make_cgroup_root(self) -> None:
        """The kubelet wants its cgroupRoot in every v1 hierarchy; cpuset needs cpus/mems filled in."""
        for hierarchy in self._hierarchies():
            root = hierarchy / CGROUP_ROOT
            root.mkdir(exist_ok=True)
            if hierarchy.name == "cpuset":
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (root / knob).write_text((hierarchy / knob).read_text())

    @staticmethod
    def _hierarchies(unified: bool = False) -> list[Path]:
        """The v1 hierarchies; with `unified`, also the hybrid layout's v2 tree (the kubelet uses it too)."""
        return [p for p in CGROUP_FS.iterdir() if p.is_dir() and not p.is_symlink() and (unified or p.name != "unified")]

    # -- containerd, images, kubelet, kube-proxy
    def start(self, *, start_component, wait_until, server: str, ca_file: Path, node_kubeconfig: Path,
              proxy_kubeconfig: Path, log_dir: Path, images: list[str], timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_containerd(start_component, wait_until, log_dir, timeout)
        self._remove_containers()  # of a run that was killed before its teardown
        for image in ["pause", *images]:
            self.import_image(image)
        self.remove_stale_images()
        self._start_kubelet(start_component, ca_file, node_kubeconfig, log_dir)
        self._start_kube_proxy(start_component, proxy_kubeconfig, log_dir)

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        # ctr wants an absolute socket path ("invalid (non-empty) authority" otherwise).
        return run(str(self.bin_dir / "ctr"), f"--address={self.containerd_socket}", "-n", "k8s.io", *args,
                   check=check, timeout=timeout)

    def import_image(self, name: str) -> None:
        """Import `<images>/<name>.tar` unless the store already holds that build of it (the archive's
        image ID, written by tools/build-images.sh, is recorded next to the store)."""
        archive = self.images_dir / f"{name}.tar"
        if not archive.is_file():
            raise NodeError(f"image archive {archive} missing: run tools/build-images.sh")
        id_file = archive.with_name(archive.name + ".id")
        image_id = id_file.read_text().strip() if id_file.is_file() else None
        marker = self.store_dir / "imported" / f"{name}.json"
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError):
            recorded = {}
        present = set(self.ctr("images", "ls", "-q").stdout.split())
        if image_id and recorded.get("id") == image_id and set(recorded.get("refs", [])) <= present:
            return
        marker.unlink(missing_ok=True)
        self.ctr("images", "import", "--snapshotter=overlayfs", str(archive))
        refs = archive_refs(archive)
        if image_id and refs:
            marker.parent.mkdir(exist_ok=True)
            marker.write_text(json.dumps({"id": image_id, "refs": refs}))

    def image_refs(self) -> dict[str, str]:
        """Every image ref in the store and the manifest digest it points at."""
        rows = (line.split() for line in self.ctr("images", "ls").stdout.splitlines()[1:])
        return {row[0]: row[2] for row in rows if len(row) >= 3}

    def stale_image_refs(self) -> list[str]:
        """The refs CRI keeps by image ID (`sha256:<config>`) for builds no name points at any more."""
        refs = self.image_refs()
        named = {digest for ref, digest in refs.items() if not ref.startswith("sha256:")}
        return [ref for ref, digest in refs.items() if ref.startswith("sha256:") and digest not in named]

    def remove_stale_images(self) -> list[str]:
        """Drop the stale by-ID refs: each rebuilt worker (~6 GB) would otherwise stay in the store for
        good (a CI machine ran out of disk that way). Returns the refs removed."""
        stale = self.stale_image_refs()
        if stale:  # --sync: containerd's garbage collector frees the content and snapshots before we go on
            self.ctr("images", "rm", "--sync", *stale)
        return stale

    def _start_containerd(self, start_component, wait_until, log_dir: Path, timeout: float) -> None:
        base = self.workdir / "containerd"
        cni_conf = self.workdir / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-mlopt.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "mlopt-e2e",
            "plugins": [
                {"type": "bridge", "bridge": POD_BRIDGE, "isGateway": True, "ipMasq": False,  # never off the machine
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": str(self.workdir / "cni" / "ipam")}},
                {"type": "loopback"},
            ],
        }, indent=1))
        config = base / "config.toml"
        base.mkdir(parents=True, exist_ok=True)
        # kind's containerd config is the model; version 3 is containerd 2.x's format.
        config.write_text(f"""version = 3
root = "{self.store_dir}"
state = "{base / 'state'}"
[grpc]
  address = "{self.containerd_socket}"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"
[plugins.'io.containerd.cri.v1.runtime']
  # No CAP_SYS_RESOURCE here: runc may not lower oom_score_adj, so clamp instead of failing.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{CNI_BIN}"]
    conf_dir = "{cni_conf}"
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
""")
        comp = start_component("containerd", [str(self.bin_dir / "containerd"), f"--config={config}",
                                              "--log-level=warn"], log_dir)
        self.components.append(comp)
        wait_until("containerd's socket", lambda: self.ctr("version", check=False).returncode == 0, timeout, [comp])

    def _start_kubelet(self, start_component, ca_file: Path, kubeconfig: Path, log_dir: Path) -> None:
        from .control_plane import free_port

        config = self.workdir / "kubelet.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # kubelet 1.35 refuses cgroup v1 otherwise (KEP-5573); v2 is impossible here
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "address": NODE_IP, "port": free_port(), "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(ca_file)}},
            "authorization": {"mode": "Webhook"},
            # Like kind: never evict or GC images for disk pressure (the worker image is large).
            "imageGCHighThresholdPercent": 100,
            "evictionHard": {"nodefs.available": "0%", "nodefs.inodesFree": "0%", "imagefs.available": "0%"},
            "podLogsDir": str(self.workdir / "pod-logs"),
            "resolvConf": "/etc/resolv.conf",
            "serializeImagePulls": False,
            "nodeStatusReportFrequency": "10s",
        }, indent=1))
        argv = [str(self.bin_dir / "kubelet"), f"--config={config}", f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.workdir / 'kubelet'}", f"--hostname-override={self.name}",
                f"--node-ip={NODE_IP}", "--v=1"]
        self.components.append(start_component("kubelet", argv, log_dir))

    def _start_kube_proxy(self, start_component, kubeconfig: Path, log_dir: Path) -> None:
        from .control_plane import free_port

        config = self.workdir / "kube-proxy.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": self.name, "clusterCIDR": CLUSTER_CIDR,
            "healthzBindAddress": f"127.0.0.1:{free_port()}", "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "conntrack": {"maxPerCore": 0},  # leave nf_conntrack_max alone (kind does the same)
            "nodePortAddresses": [f"{NODE_IP}/32"],
            "iptables": {"localhostNodePorts": False},  # no route_localnet change
        }, indent=1))
        self.components.append(start_component("kube-proxy", [str(self.bin_dir / "kube-proxy"), f"--config={config}"],
                                               log_dir))

    # -- teardown
    def stop(self, api=None) -> None:
        """Pods first (through the kubelet, so CNI releases addresses), then the processes, then what
        they left on the host."""
        if api is not None and any(c.name == "kubelet" and c.alive() for c in self.components):
            self._delete_pods(api)
        for comp in reversed(self.components):
            if comp.name != "containerd":
                comp.stop()
        if any(c.name == "containerd" and c.alive() for c in self.components):
            self._kill_tasks()
        for comp in self.components:
            if comp.name == "containerd":
                comp.stop()
        self.components.clear()
        self._remove_leftovers()
        for name, value in self._sysctls.items():
            (Path("/proc/sys") / name).write_text(value)
        self._sysctls.clear()
        if self._store_lock is not None:
            self._store_lock.close()
            self._store_lock = None

    def _delete_pods(self, api, timeout: float = 60) -> None:
        pods = api.request("GET", "/api/v1/pods").get("items", [])
        for pod in pods:
            meta = pod["metadata"]
            try:
                api.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}?gracePeriodSeconds=0")
            except Exception:  # already gone
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._running_sandboxes():
            time.sleep(1)

    def _running_sandboxes(self) -> list[str]:
        result = self.ctr("tasks", "ls", "-q", check=False, timeout=30)
        return result.stdout.split() if result.returncode == 0 else []

    def _kill_tasks(self) -> None:
        for task in self._running_sandboxes():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=30)
        time.sleep(1)
        self._remove_containers()

    def _remove_containers(self) -> None:
        """Tasks, containers (with their writable snapshots) and sandboxes: only images stay in the store."""
        for task in self.ctr("tasks", "ls", "-q", check=False, timeout=30).stdout.split():
            self.ctr("tasks", "delete", "-f", task, check=False, timeout=30)
        for container in self.ctr("containers", "ls", "-q", check=False, timeout=30).stdout.split():
            self.ctr("containers", "delete", container, check=False, timeout=30)
        listing = self.ctr("sandboxes", "ls", check=False, timeout=30).stdout.splitlines()[1:]  # below the header
        for sandbox in (line.split()[0] for line in listing if line.strip()):
            self.ctr("sandboxes", "rm", "-f", sandbox, check=False, timeout=30)

    def _remove_leftovers(self) -> None:
        # Shims and pod processes of a run that died: every process in our cgroup tree.
        for hierarchy in self._hierarchies(unified=True) if CGROUP_FS.exists() else []:
            for procs in (hierarchy / CGROUP_ROOT).rglob("cgroup.procs") if (hierarchy / CGROUP_ROOT).exists() else []:
                for pid in procs.read_text().split():
                    try:
                        os.kill(int(pid), 9)
                    except (ProcessLookupError, ValueError):
                        pass
        run("pkill", "-9", "-f", str(self.bin_dir / "containerd-shim-runc-v2"), check=False)
        for mount in self._mounts():
            run("umount", "-l", mount, check=False)
        for link in (POD_BRIDGE, NODE_BRIDGE):
            run("ip", "link", "del", link, check=False)
        for veth in Path("/sys/class/net").iterdir():
            master = veth / "master"
            if master.exists() and master.resolve().name == POD_BRIDGE:
                run("ip", "link", "del", veth.name, check=False)
        remove_kube_iptables_chains()
        for hierarchy in self._hierarchies(unified=True) if CGROUP_FS.exists() else []:
            root = hierarchy / CGROUP_ROOT
            if root.exists():
                for cgroup in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                     reverse=True) + [root]:
                    try:
                        cgroup.rmdir()
                    except OSError:
                        pass
        for path in HOST_PATHS:
            shutil.rmtree(path, ignore_errors=True)

    def _mounts(self) -> list[str]:
        """Mounts under the work dir, the image store and the host paths (rootfs overlays, netns, shm),
        deepest first so that each can be unmounted."""
        roots = [str(self.workdir), str(self.store_dir), *(str(p) for p in HOST_PATHS)]
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        return sorted((m for m in mounts if any(m == r or m.startswith(r + "/") for r in roots)), key=len, reverse=True)

    def leftovers(self) -> list[str]:
        """What the node has left on this machine: empty after a complete stop()."""
        found = [f"network link {link}" for link in (POD_BRIDGE, NODE_BRIDGE) if (Path("/sys/class/net") / link).exists()]
        found += [f"mount {mount}" for mount in self._mounts()]
        found += [f"path {p}" for p in HOST_PATHS if p.exists()]
        found += [f"cgroup {p / CGROUP_ROOT}" for p in self._hierarchies(unified=True) if (p / CGROUP_ROOT).exists()]
        if shutil.which("iptables-save"):
            found += [f"iptables chain {line[1:].split()[0]}"
                      for line in run("iptables-save", check=False).stdout.splitlines() if line.startswith(":KUBE-")]
        return found


def archive_refs(archive: Path) -> list[str]:
    """The image names a docker-archive holds (its manifest.json's RepoTags); ctr's own output
    mangles some of them for display."""
    import tarfile

    with tarfile.open(archive) as tar:  # uncompressed: members are found by seeking, not reading
        manifest = tar.extractfile("manifest.json")
        return [tag for image in json.load(manifest) for tag in image.get("RepoTags") or []]


def remove_kube_iptables_chains() -> None:
    """Remove every KUBE-* chain the kubelet and kube-proxy installed, and the rules jumping to them."""
    for tool in ("iptables", "ip6tables"):
        if not shutil.which(tool):
            continue
        saved = run(f"{tool}-save", check=False).stdout
        table = ""
        chains: dict[str, list[str]] = {}
        for line in saved.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":KUBE-"):
                chains.setdefault(table, []).append(line[1:].split()[0])
            elif line.startswith("-A ") and "KUBE-" in line:
                chain = line.split()[1]
                if not chain.startswith("KUBE-"):  # a rule in a built-in chain that jumps to ours
                    run(tool, "-t", table, "-D", *shlex.split(line)[1:], check=False)
        for table, names in chains.items():
            for name in names:
                run(tool, "-t", table, "-F", name, check=False)
            for name in names:
                run(tool, "-t", table, "-X", name, check=False)
