"""A TEST NODE, not a kubelet.

It lets the real control plane in tests/e2e/control_plane.py run Jobs to completion on this machine:

- registers a Ready Node (capacity cpu/memory/pods, address 127.0.0.1);
- binds every unscheduled pod to itself (pods/binding; no kube-scheduler runs);
- runs each container's `command` + `args` (with `$(VAR)` expansion) as a local process in the
  project's environment: PATH starts with the project venv's bin, HOME/LANG come from the host, then
  the container's resolved `env`/`envFrom` (`value`, configMap/secret keys, `fieldRef` for metadata
  name/namespace/uid/labels/annotations, spec.nodeName/serviceAccountName, status.podIP/hostIP)
  and KUBERNETES_SERVICE_HOST/PORT pointing at the API server;
- gives every container a private mount namespace (`unshare --mount --propagation private`) and a
  root view (tmpfs whose top-level entries are recursive binds of the host's), so volumes can be
  mounted at any `mountPath` without creating anything on the host: emptyDir (fresh dir),
  configMap, secret, downwardAPI and projected (serviceAccountToken via TokenRequest, configMap,
  secret, downwardAPI) volumes, `subPath`, `readOnly`, and `terminationMessagePath` (default
  /dev/termination-log, a bind-mounted temp file; /dev is shadowed by a tmpfs copy so nothing is
  created in the host's /dev). When a mountPath's parent does not exist on the host, the nearest
  existing ancestor is shadowed the same way: its entries stay the host's, but NEW files created
  directly in it land in the container's tmpfs;
- writes pod status: Running (containerStatuses running, conditions Ready etc., podIP 127.0.0.1,
  which is the truth: containers share the host network), then Succeeded/Failed with
  `state.terminated{exitCode, reason, message, startedAt, finishedAt}`; the message is the
  termination file (<= 4096 bytes) or, with FallbackToLogsOnError, a non-zero exit and an empty
  file, the log tail;
- on deletion (deletionTimestamp, e.g. from Job activeDeadlineSeconds, GC or namespace deletion):
  SIGTERM to the container's process group, SIGKILL after the grace period, terminal status, then
  DELETE with gracePeriodSeconds=0.

Container output goes to <workdir>/logs/<namespace>_<pod>_<container>.log; `kubectl logs` is NOT
served (nor exec, attach, port-forward: no kubelet API).

It does NOT do: images (recorded in status, never pulled: the command must be set), init or
ephemeral containers, restarts (restartPolicy is treated as Never), probes, hostPath/PVC/other
volume types (the pod fails with a message), networking (no pod IPs, no Services), resource
requests/limits enforcement, OOMKilled, security contexts/users, node heartbeats/Leases.

Run: python testnode.py run --server URL --ca-file F --cert-file F --key-file F --name N --workdir D
(the `exec` subcommand is the in-namespace helper that sets up mounts and execs a container).
Only the standard library is imported, so the helper starts fast under any interpreter.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import datetime as dt
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

HOST_IP = "127.0.0.1"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE = 4096  # kubelet's per-container limit
LOG_TAIL_LINES = 80  # kubelet's FallbackToLogsOnError tail: 80 lines ...
LOG_TAIL_BYTES = 2048  # ... at most 2 KiB
START_ERROR_EXIT = 128


class ConfigError(Exception):
    """The pod references something missing (kubelet: CreateContainerConfigError); retried later."""


class UnsupportedError(Exception):
    """The pod uses a feature the test node does not implement; the pod is failed with this text."""


# --------------------------------------------------------------------------------------------------
# Pure functions: pod spec -> what to run, results -> pod status (unit-tested without a cluster).


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_FIELD_LABEL = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref_value(pod: dict, field_path: str) -> str:
    meta, spec = pod.get("metadata", {}), pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": HOST_IP,
        "status.hostIP": HOST_IP,
    }
    if field_path in simple:
        return simple[field_path]
    match = _FIELD_LABEL.match(field_path)
    if match:
        return meta.get(match.group(1), {}).get(match.group(2), "")
    raise UnsupportedError(f"fieldRef {field_path!r} is not supported by the test node")


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_refs(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known names are replaced, `$$` escapes, unknown stay as-is."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, text)


Lookup = Callable[[str, str], "dict[str, bytes] | None"]  # (namespace, name) -> data or None


def _key_ref(ref: dict, namespace: str, lookup: Lookup, kind: str) -> str | None:
    data = lookup(namespace, ref["name"])
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ConfigError(f"{kind} {ref['name']!r} key {ref['key']!r} not found")
    return data[ref["key"]].decode()


def resolve_env(container: dict, pod: dict, configmaps: Lookup, secrets: Lookup) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env in order."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        kind, ref, lookup = (
            ("configMap", source["configMapRef"], configmaps)
            if "configMapRef" in source
            else ("secret", source["secretRef"], secrets)
        )
        data = lookup(namespace, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f"{kind} {ref['name']!r} not found")
        env.update({prefix + key: value.decode() for key, value in data.items()})
    for var in container.get("env", []):
        value = _env_var_value(var, pod, env, configmaps, secrets)
        if value is not None:
            env[var["name"]] = value
    return env


def _env_var_value(var: dict, pod: dict, env: dict, configmaps: Lookup, secrets: Lookup) -> str | None:
    if "valueFrom" not in var:
        return expand_refs(var.get("value", ""), env)
    source, namespace = var["valueFrom"], pod["metadata"]["namespace"]
    if "configMapKeyRef" in source:
        return _key_ref(source["configMapKeyRef"], namespace, configmaps, "configMap")
    if "secretKeyRef" in source:
        return _key_ref(source["secretKeyRef"], namespace, secrets, "secret")
    if "fieldRef" in source:
        return field_ref_value(pod, source["fieldRef"]["fieldPath"])
    raise UnsupportedError(f"env {var['name']!r}: only value, configMapKeyRef, secretKeyRef, fieldRef")


def container_argv(container: dict, env: dict[str, str]) -> list[str]:
    command = container.get("command") or []
    if not command:
        raise UnsupportedError(
            f"container {container['name']!r} has no command; the test node runs no images"
        )
    return [expand_refs(part, env) for part in command + container.get("args", [])]


def exit_code_of(returncode: int) -> int:
    """Popen reports death by signal N as -N; a container runtime reports 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def tail_text(data: bytes, max_lines: int = LOG_TAIL_LINES, max_bytes: int = LOG_TAIL_BYTES) -> str:
    lines = data.splitlines(keepends=True)[-max_lines:]
    return b"".join(lines)[-max_bytes:].decode(errors="replace")


def termination_message(file_content: bytes, policy: str, exit_code: int, log: bytes) -> str:
    if file_content:
        return file_content[:MAX_TERMINATION_MESSAGE].decode(errors="replace")
    if policy == "FallbackToLogsOnError" and exit_code != 0:
        return tail_text(log)
    return ""


def merge_conditions(existing: list[dict], updates: list[dict]) -> list[dict]:
    """Replace conditions of the updated types, keep the others (e.g. DisruptionTarget)."""
    updated = {cond["type"] for cond in updates}
    return [c for c in existing if c["type"] not in updated] + updates


def _condition(kind: str, status: bool, when: str, reason: str = "") -> dict:
    cond = {"type": kind, "status": "True" if status else "False", "lastTransitionTime": when}
    if reason:
        cond["reason"] = reason
    return cond


def _pod_conditions(pod: dict, ready: bool, when: str, reason: str = "") -> list[dict]:
    conditions = [
        _condition("PodScheduled", True, when),
        _condition("PodReadyToStartContainers", ready, when),
        _condition("Initialized", True, when),
        _condition("ContainersReady", ready, when, reason),
        _condition("Ready", ready, when, reason),
    ]
    return merge_conditions(pod.get("status", {}).get("conditions", []), conditions)


def _container_status(container: dict, state: dict, ready: bool, container_id: str = "") -> dict:
    status = {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": ready,
        "started": "running" in state,
        "restartCount": 0,
        "state": state,
    }
    if container_id:
        status["containerID"] = container_id
    return status


def _ip_fields() -> dict:
    return {"hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}], "podIP": HOST_IP, "podIPs": [{"ip": HOST_IP}]}


def build_status_running(pod: dict, started_at: str, container_ids: dict[str, str]) -> dict:
    containers = pod["spec"]["containers"]
    return {
        "phase": "Running",
        "startTime": started_at,
        **_ip_fields(),
        "conditions": _pod_conditions(pod, True, started_at),
        "containerStatuses": [
            _container_status(c, {"running": {"startedAt": started_at}}, True, container_ids.get(c["name"], ""))
            for c in containers
        ],
    }


def build_status_waiting(pod: dict, reason: str, message: str) -> dict:
    when = now_rfc3339()
    return {
        "phase": "Pending",
        **_ip_fields(),
        "conditions": _pod_conditions(pod, False, when, "ContainersNotReady"),
        "containerStatuses": [
            _container_status(c, {"waiting": {"reason": reason, "message": message}}, False)
            for c in pod["spec"]["containers"]
        ],
    }


@dataclass
class ContainerResult:
    exit_code: int
    message: str
    started_at: str
    finished_at: str
    reason: str = ""  # default: Completed for exit 0, Error otherwise
    container_id: str = ""


def terminated_state(result: ContainerResult) -> dict:
    reason = result.reason or ("Completed" if result.exit_code == 0 else "Error")
    state = {
        "exitCode": result.exit_code,
        "reason": reason,
        "startedAt": result.started_at,
        "finishedAt": result.finished_at,
    }
    if result.message:
        state["message"] = result.message
    if result.container_id:
        state["containerID"] = result.container_id
    return {"terminated": state}


def terminated_status(pod: dict, results: dict[str, ContainerResult], started_at: str) -> dict:
    """Final status: Succeeded only if every container exited 0 (restartPolicy Never semantics)."""
    containers = pod["spec"]["containers"]
    succeeded = all(results[c["name"]].exit_code == 0 for c in containers)
    finished = max(r.finished_at for r in results.values())
    reason = "PodCompleted" if succeeded else "PodFailed"
    return {
        "phase": "Succeeded" if succeeded else "Failed",
        "startTime": started_at,
        **_ip_fields(),
        "conditions": _pod_conditions(pod, False, finished, reason),
        "containerStatuses": [
            _container_status(c, terminated_state(results[c["name"]]), False, results[c["name"]].container_id)
            for c in containers
        ],
    }


def failed_without_running(pod: dict, message: str) -> dict:
    """Terminal status for a pod that could not start (unsupported feature)."""
    when = now_rfc3339()
    results = {
        c["name"]: ContainerResult(START_ERROR_EXIT, message, when, when, reason="StartError")
        for c in pod["spec"]["containers"]
    }
    status = terminated_status(pod, results, when)
    status["message"], status["reason"] = message, "TestNodeUnsupported"
    return status


def _key_to_path_items(data: dict[str, bytes], items: list[dict] | None, default_mode: int) -> dict:
    if not items:
        return {key: (value, default_mode) for key, value in data.items()}
    return {item["path"]: (data[item["key"]], item.get("mode", default_mode)) for item in items if item["key"] in data}


def _source_files(kind: str, source: dict, pod: dict, lookups: "VolumeLookups", mode: int) -> dict:
    namespace = pod["metadata"]["namespace"]
    if kind in ("configMap", "secret"):
        name = source.get("name") or source.get("secretName")
        lookup = lookups.configmaps if kind == "configMap" else lookups.secrets
        data = lookup(namespace, name)
        if data is None:
            if source.get("optional"):
                return {}
            raise ConfigError(f"{kind} {name!r} not found")
        return _key_to_path_items(data, source.get("items"), source.get("defaultMode", mode))
    if kind == "downwardAPI":
        return {
            item["path"]: (field_ref_value(pod, item["fieldRef"]["fieldPath"]).encode(), item.get("mode", mode))
            for item in source.get("items", [])
        }
    if kind == "serviceAccountToken":
        token = lookups.token(pod, source.get("audience", ""), source.get("expirationSeconds", 3600))
        return {source["path"]: (token.encode(), mode)}
    raise UnsupportedError(f"volume source {kind!r} is not supported by the test node")


@dataclass
class VolumeLookups:
    configmaps: Lookup
    secrets: Lookup
    token: Callable[[dict, str, int], str]  # (pod, audience, expirationSeconds) -> token


FILE_VOLUMES = ("configMap", "secret", "downwardAPI")


def volume_files(volume: dict, pod: dict, lookups: VolumeLookups) -> dict[str, tuple[bytes, int]] | None:
    """Files (relative path -> (content, mode)) a volume holds; None for an emptyDir."""
    if "emptyDir" in volume:
        return None
    for kind in FILE_VOLUMES:
        if kind in volume:
            return _source_files(kind, volume[kind], pod, lookups, volume[kind].get("defaultMode", 0o644))
    if "projected" in volume:
        mode = volume["projected"].get("defaultMode", 0o644)
        files: dict = {}
        for source in volume["projected"].get("sources", []):
            (kind, body), = source.items()
            files.update(_source_files(kind, body, pod, lookups, mode))
        return files
    kinds = sorted(set(volume) - {"name"})
    raise UnsupportedError(f"volume {volume['name']!r}: type {kinds} is not supported by the test node")


# --------------------------------------------------------------------------------------------------
# Inside the container's mount namespace (`exec` subcommand): root view, mounts, chroot, exec.

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: Path, fstype: str | None = None, flags: int = 0, data: str | None = None):
    encode = lambda s: s.encode() if s is not None else None  # noqa: E731
    if _libc.mount(encode(source), encode(str(target)), encode(fstype), flags, encode(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _replicate(entry: os.DirEntry, dest: Path) -> None:
    """Make dest look like entry: same symlink, or a (recursive) bind of the dir/file/device."""
    if entry.is_symlink():
        os.symlink(os.readlink(entry.path), dest)
    elif entry.is_dir():
        dest.mkdir()
        _mount(entry.path, dest, flags=MS_BIND | MS_REC)
    else:
        dest.touch()
        _mount(entry.path, dest, flags=MS_BIND)


def _tmpfs_copy_of(source: Path, target: Path) -> None:
    """Mount a tmpfs at target holding binds of every entry of source (writable, host untouched)."""
    _mount("tmpfs", target, "tmpfs", 0, f"mode={oct(source.stat().st_mode & 0o7777)[2:]}")
    for entry in os.scandir(source):
        _replicate(entry, target / entry.name)


class RootView:
    """A new root for one container; mount points are created in tmpfs layers, never on the host."""

    def __init__(self, root: Path, scratch: Path):
        self.root, self.scratch = root, scratch
        self.owned: set[Path] = {root}  # dirs on our tmpfs, where creating entries is harmless
        _tmpfs_copy_of(Path("/"), root)

    def resolve(self, path: str) -> tuple[Path, list[str]]:
        """Follow symlinks inside the view; return the deepest existing dir and the missing rest."""
        current, parts, hops = self.root, [p for p in path.split("/") if p], 0
        while parts:
            candidate = current / parts[0]
            if candidate.is_symlink():
                hops += 1
                if hops > 40:
                    raise OSError(f"too many symlinks resolving {path}")
                target = os.readlink(candidate)
                base = self.root if target.startswith("/") else current
                parts = [p for p in target.split("/") if p] + parts[1:]
                current = base
                continue
            if parts[0] == "..":
                current = current.parent if current != self.root else current
            elif not candidate.exists():
                return current, parts
            else:
                current = candidate
            parts = parts[1:]
        return current, []

    def _shadow(self, directory: Path) -> None:
        staging = self.scratch / f"shadow-{len(self.owned)}"
        staging.mkdir(parents=True)
        _tmpfs_copy_of(directory, staging)
        _mount(str(staging), directory, flags=MS_BIND | MS_REC)
        self.owned.add(directory)

    def mount_point(self, path: str, is_dir: bool) -> Path:
        existing, missing = self.resolve(path)
        if not missing:
            return existing
        if existing not in self.owned:
            self._shadow(existing)
        for part in missing[:-1]:
            existing = existing / part
            existing.mkdir()
            self.owned.add(existing)
        target = existing / missing[-1]
        target.mkdir() if is_dir else target.touch()
        self.owned.add(target)
        return target

    def bind(self, source: str, path: str, read_only: bool = False) -> None:
        target = self.mount_point(path, Path(source).is_dir())
        _mount(source, target, flags=MS_BIND | MS_REC)
        if read_only:
            _mount(None, target, flags=MS_BIND | MS_REMOUNT | MS_RDONLY)


def exec_container(plan_path: str) -> None:
    """Runs as the container process itself (PID kept through unshare and exec)."""
    plan = json.loads(Path(plan_path).read_text())
    try:
        view = RootView(Path(plan["root"]), Path(plan["scratch"]))
        # Outer paths first, so a mount inside another volume lands on top of it.
        for mount in sorted(plan["mounts"], key=lambda m: m["path"].count("/")):
            view.bind(mount["source"], mount["path"], mount.get("readOnly", False))
        os.chroot(plan["root"])
        os.chdir(plan["workingDir"])
        os.execvpe(plan["argv"][0], plan["argv"], plan["env"])
    except Exception as exc:  # report why the container could not start, kubelet-style
        Path(plan["startErrorFile"]).write_text(f"{type(exc).__name__}: {exc}")
        print(f"testnode: cannot start container: {exc}", file=sys.stderr, flush=True)
        os._exit(START_ERROR_EXIT)


# --------------------------------------------------------------------------------------------------
# Talking to the API server (stdlib HTTPS with the admin client certificate).


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status


class Api:
    def __init__(self, server: str, ca_file: str, cert_file: str, key_file: str):
        url = urllib.parse.urlsplit(server)
        self.host, self.port = url.hostname, url.port or 443
        self.context = ssl.create_default_context(cafile=ca_file)
        self.context.load_cert_chain(cert_file, key_file)

    def _connection(self, timeout: float) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None, query: dict | None = None,
                content_type: str = "application/json") -> dict:
        if query:
            path += "?" + urllib.parse.urlencode(query)
        conn = self._connection(30)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": content_type, "Accept": "application/json"})
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        if response.status >= 300:
            raise ApiError(response.status, text)
        return json.loads(text) if text else {}

    def watch(self, path: str, query: dict) -> Iterator[dict]:
        conn = self._connection(query.get("timeoutSeconds", 60) + 30)
        try:
            conn.request("GET", path + "?" + urllib.parse.urlencode({**query, "watch": "1"}))
            response = conn.getresponse()
            if response.status >= 300:
                raise ApiError(response.status, response.read().decode())
            while line := response.readline():
                yield json.loads(line)
        finally:
            conn.close()

    def get_or_none(self, path: str) -> dict | None:
        try:
            return self.request("GET", path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise


# --------------------------------------------------------------------------------------------------
# The node: register, bind, run, report, delete.


@dataclass
class NodeConfig:
    name: str
    workdir: Path
    path_prepend: list[str]
    api_port: int
    pass_env: tuple[str, ...] = ("HOME", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "MLOPT_CACHE")


def node_object(name: str) -> dict:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
    resources = {"cpu": str(os.cpu_count() or 1), "memory": f"{pages}Ki", "pods": "110"}
    when = now_rfc3339()
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "mlopt.dev/test-node": "true"},
        },
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": name}],
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "TestNodeReady", "message": "mlopt test node",
                 "lastHeartbeatTime": when, "lastTransitionTime": when}
            ],
            "nodeInfo": {"kubeletVersion": "testnode", "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "testnode://1", "osImage": "local processes"},
        },
    }


def pod_path(pod: dict, sub: str = "") -> str:
    meta = pod["metadata"]
    return f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}" + (f"/{sub}" if sub else "")


@dataclass
class Container:
    spec: dict
    process: subprocess.Popen
    log: Path
    termination_file: Path
    start_error_file: Path
    started_at: str


class PodRunner(threading.Thread):
    """Runs one pod's containers and reports their life to the API server."""

    def __init__(self, node: "TestNode", pod: dict):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.node, self.pod, self.uid = node, pod, meta["uid"]
        self.dir = node.config.workdir / "pods" / self.uid
        self.deleted = threading.Event()  # deletionTimestamp seen
        self.grace = 30
        self.containers: list[Container] = []

    def request_stop(self, grace: int) -> None:
        self.grace = grace
        self.deleted.set()

    def run(self) -> None:
        try:
            self._run()
        except ConfigError as err:
            self._patch_status(build_status_waiting(self.pod, "CreateContainerConfigError", str(err)))
            self.node.forget(self.uid)  # retried at the next relist
            return
        except UnsupportedError as err:
            self._patch_status(failed_without_running(self.pod, str(err)))
        except Exception as err:  # keep the node alive; make the failure visible in the pod
            print(f"testnode: pod {self.name}: {err!r}", file=sys.stderr, flush=True)
            self._reap()  # containers already started must not outlive the pod
            self._patch_status(failed_without_running(self.pod, f"test node error: {err!r}"))
        if self.deleted.is_set():
            self.node.delete_now(self.pod)

    def _run(self) -> None:
        specs = self.pod["spec"]["containers"]
        envs = {c["name"]: self.node.container_env(c, self.pod) for c in specs}
        argvs = {c["name"]: container_argv(c, envs[c["name"]]) for c in specs}
        volumes = self._prepare_volumes()
        if self.deleted.is_set():
            return
        started_at = now_rfc3339()
        for spec in specs:
            self.containers.append(self._start(spec, argvs[spec["name"]], envs[spec["name"]], volumes, started_at))
        ids = {c.spec["name"]: f"testnode://{c.process.pid}" for c in self.containers}
        self._patch_status(build_status_running(self.pod, started_at, ids))
        self._wait_or_kill()
        results = {c.spec["name"]: self._result(c) for c in self.containers}
        self._patch_status(terminated_status(self.pod, results, started_at))

    def _prepare_volumes(self) -> dict[str, Path]:
        paths = {}
        for volume in self.pod["spec"].get("volumes", []):
            path = self.dir / "volumes" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            for rel, (content, mode) in (volume_files(volume, self.pod, self.node.lookups) or {}).items():
                file = path / rel
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_bytes(content)
                file.chmod(mode)
            paths[volume["name"]] = path
        return paths

    def _mounts(self, spec: dict, volumes: dict[str, Path], termination_file: Path) -> list[dict]:
        mounts = []
        for mount in spec.get("volumeMounts", []):
            if mount["name"] not in volumes:
                raise UnsupportedError(f"volumeMount {mount['name']!r} has no volume")
            source = volumes[mount["name"]] / mount.get("subPath", "")
            if "subPath" in mount and not source.exists():
                source.mkdir(parents=True)  # kubelet creates a missing subPath as a directory
            mounts.append({"source": str(source), "path": mount["mountPath"], "readOnly": mount.get("readOnly", False)})
        path = spec.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        mounts.append({"source": str(termination_file), "path": path})
        return mounts

    def _start(self, spec: dict, argv: list[str], env: dict, volumes: dict, started_at: str) -> Container:
        name = spec["name"]
        cdir = self.dir / "containers" / name
        (cdir / "root").mkdir(parents=True)
        termination_file, start_error = cdir / "termination-log", cdir / "start-error"
        termination_file.touch(mode=0o666)
        plan = {
            "root": str(cdir / "root"),
            "scratch": str(cdir / "scratch"),
            "mounts": self._mounts(spec, volumes, termination_file),
            "workingDir": spec.get("workingDir") or "/",
            "argv": argv,
            "env": {**self.node.base_env(self.pod), **env},
            "startErrorFile": str(start_error),
        }
        (cdir / "plan.json").write_text(json.dumps(plan, indent=1))
        meta = self.pod["metadata"]
        log = self.node.config.workdir / "logs" / f"{meta['namespace']}_{meta['name']}_{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                self.node.unshare_argv() + [sys.executable, os.path.abspath(__file__), "exec", str(cdir / "plan.json")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: killed as a whole on deletion
            )
        self.node.track(process.pid)
        return Container(spec, process, log, termination_file, start_error, started_at)

    def _wait_or_kill(self) -> None:
        kill_at = None
        while any(c.process.poll() is None for c in self.containers):
            if self.deleted.is_set() and kill_at is None:
                self._signal_all(signal.SIGTERM)
                kill_at = time.monotonic() + self.grace
            if kill_at is not None and time.monotonic() >= kill_at:
                self._signal_all(signal.SIGKILL)
            time.sleep(0.2)
        self._reap()

    def _reap(self) -> None:
        # Children that outlived the main process (daemonized helpers) die with the container.
        self._signal_all(signal.SIGKILL)
        for c in self.containers:
            c.process.wait()
            self.node.untrack(c.process.pid)

    def _signal_all(self, sig: int) -> None:
        for c in self.containers:
            try:
                os.killpg(c.process.pid, sig)
            except ProcessLookupError:
                pass

    def _result(self, c: Container) -> ContainerResult:
        code = exit_code_of(c.process.returncode)
        finished = now_rfc3339()
        if c.start_error_file.exists():
            message = c.start_error_file.read_text()[:MAX_TERMINATION_MESSAGE]
            return ContainerResult(code, message, c.started_at, finished, "StartError", f"testnode://{c.process.pid}")
        policy = c.spec.get("terminationMessagePolicy", "File")
        message = termination_message(c.termination_file.read_bytes(), policy, code, c.log.read_bytes())
        return ContainerResult(code, message, c.started_at, finished, container_id=f"testnode://{c.process.pid}")

    def _patch_status(self, status: dict) -> None:
        try:
            self.node.api.request("PATCH", pod_path(self.pod, "status"), {"status": status},
                                  content_type="application/merge-patch+json")
        except ApiError as err:
            if err.status != 404:  # a pod already gone needs no status
                print(f"testnode: status of {self.name}: {err}", file=sys.stderr, flush=True)


class TestNode:
    __test__ = False  # not a pytest test class

    def __init__(self, api: Api, config: NodeConfig):
        self.api, self.config = api, config
        self.runners: dict[str, PodRunner] = {}
        self.deleting: set[str] = set()
        self.lock = threading.Lock()
        self.lookups = VolumeLookups(self._configmap, self._secret, self._token)
        for sub in ("logs", "pods", "running"):
            (config.workdir / sub).mkdir(parents=True, exist_ok=True)

    # -- lookups used for env and volumes
    def _configmap(self, namespace: str, name: str) -> dict[str, bytes] | None:
        obj = self.api.get_or_none(f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        if obj is None:
            return None
        data = {k: v.encode() for k, v in obj.get("data", {}).items()}
        data.update({k: base64.b64decode(v) for k, v in obj.get("binaryData", {}).items()})
        return data

    def _secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        obj = self.api.get_or_none(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        return None if obj is None else {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}

    def _token(self, pod: dict, audience: str, expiration: int) -> str:
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName", "default")
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else None,
                "expirationSeconds": max(expiration, 600),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
            },
        }
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
        return self.api.request("POST", path, body)["status"]["token"]

    def container_env(self, container: dict, pod: dict) -> dict[str, str]:
        return resolve_env(container, pod, self._configmap, self._secret)

    def base_env(self, pod: dict) -> dict[str, str]:
        path = os.pathsep.join(self.config.path_prepend + [os.environ.get("PATH", "/usr/bin:/bin")])
        env = {k: os.environ[k] for k in self.config.pass_env if k in os.environ}
        return {
            **env,
            "PATH": path,
            "HOSTNAME": pod["metadata"]["name"],
            # What the kubelet injects for the `kubernetes` Service: in-cluster clients find the API.
            "KUBERNETES_SERVICE_HOST": HOST_IP,
            "KUBERNETES_SERVICE_PORT": str(self.config.api_port),
        }

    def unshare_argv(self) -> list[str]:
        argv = ["unshare", "--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            argv.append("--map-root-user")  # mounts need CAP_SYS_ADMIN: take it in a user namespace
        return argv

    # -- process tracking, so the harness can kill leftovers if this process is killed hard
    def track(self, pid: int) -> None:
        (self.config.workdir / "running" / str(pid)).touch()

    def untrack(self, pid: int) -> None:
        (self.config.workdir / "running" / str(pid)).unlink(missing_ok=True)

    def forget(self, uid: str) -> None:
        with self.lock:
            self.runners.pop(uid, None)

    # -- API actions
    def register(self) -> None:
        node = node_object(self.config.name)
        try:
            self.api.request("POST", "/api/v1/nodes", node)
        except ApiError as err:
            if err.status != 409:
                raise
        # Status given at create time may be dropped; set it through the subresource too.
        self.api.request("PATCH", f"/api/v1/nodes/{self.config.name}/status", {"status": node["status"]},
                         content_type="application/merge-patch+json")

    def bind(self, pod: dict) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": pod["metadata"]["name"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.config.name},
        }
        try:
            self.api.request("POST", pod_path(pod, "binding"), body)
        except ApiError as err:
            if err.status not in (404, 409):  # gone, or already bound: nothing to do
                raise

    def delete_now(self, pod: dict) -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": pod["metadata"]["uid"]}}
        try:
            self.api.request("DELETE", pod_path(pod), body)
        except ApiError as err:
            if err.status not in (404, 409):
                raise

    # -- the control loop
    def reconcile(self, pod: dict) -> None:
        spec, meta = pod["spec"], pod["metadata"]
        node_name = spec.get("nodeName")
        if not node_name:
            if not meta.get("deletionTimestamp"):
                self.bind(pod)
            return
        if node_name != self.config.name:
            return
        uid, phase = meta["uid"], pod.get("status", {}).get("phase")
        with self.lock:
            runner = self.runners.get(uid)
            if meta.get("deletionTimestamp"):
                if runner is not None and runner.is_alive():
                    runner.request_stop(meta.get("deletionGracePeriodSeconds", 30))
                elif uid not in self.deleting:
                    self.deleting.add(uid)  # never started here (or finished): just remove it
                    threading.Thread(target=self.delete_now, args=(pod,), daemon=True).start()
                return
            if runner is None and phase not in ("Succeeded", "Failed"):
                runner = self.runners[uid] = PodRunner(self, pod)
                runner.start()

    def pod_gone(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            runner = self.runners.pop(uid, None)
            self.deleting.discard(uid)
        if runner is not None and runner.is_alive():
            runner.request_stop(0)  # deleted with grace 0 by someone else: stop at once

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                listing = self.api.request("GET", "/api/v1/pods")
                for pod in listing["items"]:
                    self.reconcile(pod)
                self._watch(listing["metadata"]["resourceVersion"], stop)
            except (OSError, ApiError, http.client.HTTPException, ValueError) as err:
                if not stop.is_set():
                    print(f"testnode: list/watch: {err!r}; retrying", file=sys.stderr, flush=True)
                    time.sleep(1)

    def _watch(self, resource_version: str, stop: threading.Event) -> None:
        query = {"resourceVersion": resource_version, "timeoutSeconds": 30, "allowWatchBookmarks": "true"}
        for event in self.api.watch("/api/v1/pods", query):
            if stop.is_set() or event["type"] == "ERROR":  # e.g. 410 Gone: relist
                return
            if event["type"] in ("ADDED", "MODIFIED"):
                self.reconcile(event["object"])
            elif event["type"] == "DELETED":
                self.pod_gone(event["object"])

    def shutdown(self) -> None:
        """Kill every container still running (the harness is tearing the cluster down)."""
        with self.lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.request_stop(0)
        for runner in runners:
            runner.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="register the node and run pods until SIGTERM")
    for flag in ("--server", "--ca-file", "--cert-file", "--key-file", "--name", "--workdir"):
        run.add_argument(flag, required=True)
    run.add_argument("--path-prepend", action="append", default=[], help="dirs put first on containers' PATH")
    execute = sub.add_parser("exec", help="(internal) set up mounts inside the namespace and exec")
    execute.add_argument("plan")
    args = parser.parse_args(argv)
    if args.command == "exec":
        exec_container(args.plan)
        return
    port = urllib.parse.urlsplit(args.server).port or 443
    node = TestNode(Api(args.server, args.ca_file, args.cert_file, args.key_file),
                    NodeConfig(args.name, Path(args.workdir), args.path_prepend, port))
    node.register()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    loop = threading.Thread(target=node.run, args=(stop,), daemon=True, name="list-watch")
    loop.start()
    print(f"testnode: node {args.name} registered", flush=True)
    while not stop.wait(1):  # a timed wait lets the signal handlers run promptly
        pass
    node.shutdown()


if __name__ == "__main__":
    main()
