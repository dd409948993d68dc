"""The Job that runs one generation of a ModelOptimization: a pure function of the resource.

The spec is copied into the Job (MLOPT_SPEC): a Job is immutable, so what ran is exactly what the
resource said at that generation, whatever happens to the resource later.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from optimizer.crd import GROUP, KIND, VERSION
from optimizer.spec import ModelOptimization

from .settings import Settings

LABEL_NAME = f"{GROUP}/name"
LABEL_GENERATION = f"{GROUP}/generation"
CONTAINER = "worker"
SCRATCH = "/scratch"
OUTPUT = f"{SCRATCH}/results"
UID = 10001
# Exit codes of `mlopt worker`: 1 = the optimization failed, 2 = invalid spec. Both are
# deterministic and explained in the summary, so retrying them only burns time.
FINAL_EXIT_CODES = [1, 2]


def job_name(name: str, generation: int) -> str:
    """`<name>-g<generation>`, shortened with a hash when over the 63 characters a Job may have."""
    suffix = f"-g{generation}"
    full = f"{name}{suffix}"
    if len(full) <= 63:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{name[: 63 - len(suffix) - 7].rstrip('-')}-{digest}{suffix}"


def labels(name: str, generation: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "mlopt-worker",
        "app.kubernetes.io/managed-by": "mlopt-operator",
        LABEL_NAME: name,
        LABEL_GENERATION: str(generation),
    }


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


def _resources(spec: ModelOptimization) -> dict[str, Any]:
    wanted = spec.spec.job.resources
    out = {
        "requests": wanted.requests.model_dump(exclude_none=True),
        "limits": wanted.limits.model_dump(exclude_none=True),
    }
    if spec.spec.benchmark.device == "cuda":
        out["limits"]["nvidia.com/gpu"] = "1"
    return out


def _tolerations(spec: ModelOptimization) -> list[dict[str, Any]]:
    tolerations = [t.model_dump(exclude_none=True) for t in spec.spec.job.tolerations]
    if spec.spec.benchmark.device == "cuda":
        # GPU nodes are usually tainted so that only GPU pods land there.
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _image(spec: ModelOptimization, settings: Settings) -> str:
    if spec.spec.job.image:
        return spec.spec.job.image
    return settings.gpu_worker_image if spec.spec.benchmark.device == "cuda" else settings.worker_image


def _env(resource: dict[str, Any]) -> list[dict[str, str]]:
    # The root filesystem is read-only: everything that writes goes to the scratch emptyDir.
    return [
        {"name": "MLOPT_SPEC", "value": spec_snapshot(resource)},
        {"name": "MLOPT_OUTPUT", "value": OUTPUT},
        {"name": "MLOPT_CACHE", "value": f"{SCRATCH}/cache"},
        {"name": "HOME", "value": SCRATCH},
        {"name": "TMPDIR", "value": SCRATCH},
        {"name": "MPLCONFIGDIR", "value": f"{SCRATCH}/mpl"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    ]


def build_job(resource: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The batch/v1 Job for the resource's current generation. Raises SpecError for an invalid spec."""
    from optimizer.spec_loader import parse_spec

    spec = parse_spec(resource, f"{KIND} {resource['metadata'].get('name')}")
    meta = resource["metadata"]
    generation = int(meta["generation"])
    job_labels = labels(meta["name"], generation)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
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
                "image": _image(spec, settings),
                "imagePullPolicy": settings.image_pull_policy,
                "command": ["mlopt", "worker"],
                "workingDir": SCRATCH,
                "env": _env(resource),
                "resources": _resources(spec),
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": [{"name": "scratch", "emptyDir": {}}],
    }
    if spec.spec.benchmark.device == "cuda" and settings.gpu_runtime_class:
        pod_spec["runtimeClassName"] = settings.gpu_runtime_class
    if spec.spec.job.nodeSelector:
        pod_spec["nodeSelector"] = dict(spec.spec.job.nodeSelector)
    tolerations = _tolerations(spec)
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
        "template": {"metadata": {"labels": job_labels}, "spec": pod_spec},
    }
    if settings.job_ttl_seconds is not None:
        job_spec["ttlSecondsAfterFinished"] = settings.job_ttl_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(meta["name"], generation),
            "namespace": meta.get("namespace"),
            "labels": job_labels,
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
