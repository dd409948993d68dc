"""The Job that runs one generation of a ModelOptimization: a pure function of the resource.

The spec is copied into the Job (MLOPT_SPEC): a Job is immutable, so what ran is exactly what the
resource said at that generation, whatever happens to the resource later.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from optimizer.api import uris
from optimizer.api.crd import GROUP, KIND, VERSION
from optimizer.api.spec import Device, ModelOptimization, Resources, TargetSpec

from .settings import Settings

LABEL_NAME = f"{GROUP}/name"
LABEL_GENERATION = f"{GROUP}/generation"
LABEL_TARGET = f"{GROUP}/target"  # spec.targets' name of the Job (and its pods); absent without targets
ANNOTATION_RESOURCE = f"{GROUP}/resource"  # the full resource name (a label value holds at most 63)
ANNOTATION_RESOURCE_UID = f"{GROUP}/resource-uid"  # on the pod: which resource of that name it ran for
# On every worker pod (operator/finalizer.py): a deleted pod stays, with its termination message (the
# summary), until the operator has recorded the outcome or nobody needs it.
FINALIZER = f"{GROUP}/summary"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
MANAGED_BY = "app.kubernetes.io/managed-by=mlopt-operator"  # the selector for every Job the operator made
CONTAINER = "worker"
SCRATCH = "/scratch"
OUTPUT = f"{SCRATCH}/results"
UID = 10001
# Exit codes of `mlopt worker`: 1 = the optimization failed, 2 = invalid spec. Both are
# deterministic and explained in the summary, so retrying them only burns time.
FINAL_EXIT_CODES = [1, 2]


def _fit(name: str, suffix: str = "") -> str:
    """`name + suffix` within 63 characters (a Job name, a label value): a longer name keeps its start
    and gets a hash of the whole name, so two long names never collide."""
    full = f"{name}{suffix}"
    if len(full) <= 63:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{name[: 63 - len(suffix) - 7].rstrip('-.')}-{digest}{suffix}"


def kueue_workload_names(job: str, uid: str) -> set[str]:
    """The name Kueue gives the Workload of a batch/v1 Job (jobframework.GetWorkloadNameForOwnerWithGVK
    in sigs.k8s.io/kueue): "job-<name>" cut to fit 63 characters (Kueue's ShortWorkloadNames feature)
    or 253, "-", and the first 5 hex digits of sha1("Job\nbatch\n<name>\n<uid>")."""
    digest = hashlib.sha1(f"Job\nbatch\n{job}\n{uid}".encode()).hexdigest()[:5]
    return {f"{f'job-{job}'[:limit - 6]}-{digest}" for limit in (63, 253)}


def job_name(name: str, generation: int, target: str | None = None) -> str:
    """`<name>-g<generation>` (`-<target>` after it for a target's Job), shortened with a hash when over
    the 63 characters a Job may have: target names have at most 20, so the suffix always fits whole."""
    return _fit(name, f"-g{generation}" + (f"-{target}" if target else ""))


def name_label(name: str) -> str:
    """The value of mlopt.io/name for a resource: its name, or a hashed short form of a long one
    (resource names may have 253 characters, label values 63)."""
    return _fit(name)


def labels(name: str, generation: int, target: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "mlopt-worker",
        "app.kubernetes.io/managed-by": "mlopt-operator",
        LABEL_NAME: name_label(name),
        LABEL_GENERATION: str(generation),
    }
    if target:
        out[LABEL_TARGET] = target
    return out


def spec_snapshot(resource: dict[str, Any]) -> str:
    meta = resource["metadata"]
    return json.dumps(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {
                "name": meta["name"],
                "namespace": meta.get("namespace"),
                "generation": meta.get("generation"),
            },
            "spec": resource["spec"],
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def device(spec: ModelOptimization, target: TargetSpec | None = None) -> Device:
    """The device of the pod: the target's when it names one, else spec.benchmark.device."""
    if target is not None and "device" in target.model_fields_set:
        return target.device
    return spec.spec.benchmark.device


def pod_resources(spec: ModelOptimization, target: TargetSpec | None = None) -> Resources:
    """What the pod asks for: the target's resources when it gives them, else spec.job.resources."""
    return spec.pod_resources(target)


def _resources(spec: ModelOptimization, target: TargetSpec | None) -> dict[str, Any]:
    wanted = pod_resources(spec, target)
    limits = wanted.limits.model_dump(exclude_none=True)
    # Guaranteed QoS: requests equal to limits (whole CPUs, checked in the spec).
    requests = dict(limits) if spec.spec.job.qos == "guaranteed" else wanted.requests.model_dump(exclude_none=True)
    out = {"requests": requests, "limits": limits}
    if device(spec, target) == "cuda":
        out["limits"]["nvidia.com/gpu"] = "1"
    return out


def _tolerations(spec: ModelOptimization, target: TargetSpec | None) -> list[dict[str, Any]]:
    tolerations = [t.model_dump(exclude_none=True) for t in spec.spec.job.tolerations]
    if target is not None:
        tolerations += [t.model_dump(exclude_none=True) for t in target.tolerations]
    if device(spec, target) == "cuda":
        # GPU nodes are usually tainted so that only GPU pods land there.
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _node_selector(spec: ModelOptimization, target: TargetSpec | None) -> dict[str, str]:
    """spec.job.nodeSelector with the target's on top (the target wins a key both name)."""
    return {**spec.spec.job.nodeSelector, **(target.nodeSelector if target is not None else {})}


def _image(spec: ModelOptimization, settings: Settings, target: TargetSpec | None) -> str:
    if spec.spec.job.image:
        return spec.spec.job.image
    return settings.gpu_worker_image if device(spec, target) == "cuda" else settings.worker_image


PVC_ROOT = "/mnt/pvc"  # claim <name> is mounted at /mnt/pvc/<name> (the worker's MLOPT_PVC_ROOT)
CA_BUNDLE_DIR = "/etc/mlopt/ca"


def _claims(spec: ModelOptimization) -> dict[str, bool]:
    """The PersistentVolumeClaims the spec names, each with whether the worker writes to it."""
    claims: dict[str, bool] = {}
    for uri, writes in ((spec.spec.model.source, False), (spec.spec.data.source, False), (spec.spec.output, True)):
        claim = uris.claim(uri)
        if claim:
            claims[claim] = claims.get(claim, False) or writes
    return claims


def _scratch_size(spec: ModelOptimization) -> tuple[str, str]:
    """(sizeLimit, request) of the scratch emptyDir, from the largest model the spec allows: the
    download, its export and the variants all sit there (about ten copies at most), so a runaway
    run is evicted instead of filling the node's disk."""
    mib = spec.spec.model.maxSizeMB
    return f"{10 * mib + 1024}Mi", f"{2 * mib + 1024}Mi"


def _storage_env(spec: ModelOptimization) -> list[dict[str, str]]:
    storage, env = spec.spec.storage, []
    if _claims(spec):
        env.append({"name": "MLOPT_PVC_ROOT", "value": PVC_ROOT})
    if storage.caBundle:
        env.append({"name": "AWS_CA_BUNDLE", "value": f"{CA_BUNDLE_DIR}/{storage.caBundle.key}"})
    return env


def _env(resource: dict[str, Any], spec: ModelOptimization) -> list[dict[str, str]]:
    # The root filesystem is read-only: everything that writes goes to the scratch emptyDir.
    qos = "Guaranteed" if spec.spec.job.qos == "guaranteed" else "Burstable"
    return [
        {"name": "MLOPT_QOS_CLASS", "value": qos},  # recorded in results.json: how the numbers were measured
        {"name": "MLOPT_SPEC", "value": spec_snapshot(resource)},
        {"name": "MLOPT_OUTPUT", "value": OUTPUT},
        {"name": "MLOPT_CACHE", "value": f"{SCRATCH}/cache"},
        {"name": "HOME", "value": SCRATCH},
        {"name": "TMPDIR", "value": SCRATCH},
        {"name": "MPLCONFIGDIR", "value": f"{SCRATCH}/mpl"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    ]


def _target_env(target: TargetSpec | None) -> list[dict[str, str]]:
    # The worker measures as this target (its hardware profile, its serving sweep, its output folder).
    return [{"name": "MLOPT_TARGET", "value": target.name}] if target is not None else []


def build_jobs(resource: dict[str, Any], settings: Settings, spec: ModelOptimization | None = None) -> list[dict[str, Any]]:
    """The generation's Jobs: one per spec.targets entry (in the spec's order), or the one Job without
    targets. Raises SpecError for an invalid spec."""
    spec = spec or _parse(resource)
    if not spec.spec.targets:
        return [build_job(resource, settings, spec)]
    return [build_job(resource, settings, spec, target) for target in spec.spec.targets]


def _parse(resource: dict[str, Any]) -> ModelOptimization:
    from optimizer.api.spec_loader import parse_spec

    return parse_spec(resource, f"{KIND} {resource['metadata'].get('name')}")


def build_job(resource: dict[str, Any], settings: Settings, spec: ModelOptimization | None = None,
              target: TargetSpec | None = None) -> dict[str, Any]:
    """The batch/v1 Job for the resource's current generation (on `target`'s nodes, when given); `spec` is
    the resource's parsed spec when the caller has it already. Raises SpecError for an invalid spec."""
    spec = spec or _parse(resource)
    meta = resource["metadata"]
    scratch_limit, scratch_request = _scratch_size(spec)
    resources = _resources(spec, target)
    resources["requests"]["ephemeral-storage"] = scratch_request
    mounts: list[dict[str, Any]] = [{"name": "scratch", "mountPath": SCRATCH}]
    volumes: list[dict[str, Any]] = [{"name": "scratch", "emptyDir": {"sizeLimit": scratch_limit}}]
    for index, (claim, writes) in enumerate(sorted(_claims(spec).items())):
        # Mounted whole at a fixed path; the worker reads pvc://claim/path there, nothing is rewritten.
        volumes.append({"name": f"pvc-{index}", "persistentVolumeClaim": {"claimName": claim, "readOnly": not writes}})
        mounts.append({"name": f"pvc-{index}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writes})
    if spec.spec.storage.caBundle:
        volumes.append({"name": "ca-bundle", "configMap": {"name": spec.spec.storage.caBundle.name}})
        mounts.append({"name": "ca-bundle", "mountPath": CA_BUNDLE_DIR, "readOnly": True})
    generation = int(meta["generation"])
    target_name = target.name if target is not None else None
    job_labels = labels(meta["name"], generation, target_name)
    annotations = {ANNOTATION_RESOURCE: meta["name"]}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # Only workload identity needs the token; without it the worker has no API credentials at all.
        "automountServiceAccountToken": bool(spec.spec.job.serviceAccountName),
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": CONTAINER,
                "image": _image(spec, settings, target),
                "imagePullPolicy": settings.image_pull_policy,
                "command": ["mlopt", "worker"],
                "workingDir": SCRATCH,
                "env": _env(resource, spec) + _storage_env(spec) + _target_env(target),
                "resources": resources,
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": mounts,
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": volumes,
    }
    if spec.spec.storage.secretRef:  # AWS_* keys straight from the Secret: the operator never reads it
        pod_spec["containers"][0]["envFrom"] = [{"secretRef": {"name": spec.spec.storage.secretRef}}]
    if spec.spec.job.serviceAccountName:
        pod_spec["serviceAccountName"] = spec.spec.job.serviceAccountName
    if spec.spec.job.priorityClassName:
        pod_spec["priorityClassName"] = spec.spec.job.priorityClassName
    if spec.spec.job.imagePullSecrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in spec.spec.job.imagePullSecrets]
    if device(spec, target) == "cuda" and settings.gpu_runtime_class:
        pod_spec["runtimeClassName"] = settings.gpu_runtime_class
    if node_selector := _node_selector(spec, target):
        pod_spec["nodeSelector"] = node_selector
    tolerations = _tolerations(spec, target)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.spec.job.backoffLimit,
        "activeDeadlineSeconds": spec.spec.job.activeDeadlineSeconds,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": FINAL_EXIT_CODES},
                },
                # A preempted or evicted pod is not the worker's fault: do not count it.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        # The Job controller copies the template's finalizers onto each pod it makes.
        "template": {"metadata": {"labels": job_labels, "finalizers": [FINALIZER],
                                  "annotations": {**annotations, ANNOTATION_RESOURCE_UID: meta["uid"]}},
                     "spec": pod_spec},
    }
    if spec.spec.job.queueName:  # Kueue admits the Job by unsuspending it
        job_spec["suspend"] = True
        job_labels = {**job_labels, LABEL_QUEUE: spec.spec.job.queueName}
    if settings.job_ttl_seconds is not None:
        job_spec["ttlSecondsAfterFinished"] = settings.job_ttl_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(meta["name"], generation, target_name),
            "namespace": meta.get("namespace"),
            "labels": job_labels,
            "annotations": annotations,
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": KIND,
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": job_spec,
    }
