"""Operator settings, from environment variables (the Deployment sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from optimizer import __version__


@dataclass(frozen=True)
class Waits:
    """How long a Job may wait on each kind of problem before the resource ends Failed (seconds)."""

    failed_create: int = 60  # the Job controller cannot create the pod (quota, admission, a missing account)
    image: int = 300  # image pull or container config problems: a registry hiccup may pass
    unschedulable: int = 600  # no node fits: a cluster autoscaler may add one


def _int(env: dict[str, str], key: str, default: int) -> int:
    value = env.get(key)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{key}={value!r} is not a whole number") from None


@dataclass(frozen=True)
class Settings:
    worker_image: str = f"mlopt/worker:{__version__}"
    gpu_worker_image: str = f"mlopt/worker-gpu:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    # Finished Jobs are kept by default: their pods' logs explain a run, and a Job that vanished
    # must not look like "not started yet" to an operator that restarts.
    job_ttl_seconds: int | None = None
    # Clusters whose GPU nodes use a separate container runtime handler (e.g. "nvidia").
    gpu_runtime_class: str | None = None
    # Optimizations running at once (0 = no cap), in the cluster and per namespace: benchmark pods
    # that share a node disturb each other's timings, so the rest wait as Queued, FIFO within a priority.
    max_running: int = 8
    max_running_per_namespace: int = 0
    waits: Waits = field(default_factory=Waits)
    metrics_port: int = 9090  # /metrics (Prometheus text format); 0 turns it off
    # The operator's own namespace (the Deployment sets POD_NAMESPACE): its Lease and policy ConfigMap live there.
    namespace: str = "mlopt-system"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        ttl = env.get("MLOPT_JOB_TTL_SECONDS")
        defaults = Waits()
        return cls(
            worker_image=env.get("MLOPT_WORKER_IMAGE") or cls.worker_image,
            gpu_worker_image=env.get("MLOPT_GPU_WORKER_IMAGE") or cls.gpu_worker_image,
            image_pull_policy=env.get("MLOPT_IMAGE_PULL_POLICY") or cls.image_pull_policy,
            job_ttl_seconds=int(ttl) if ttl else None,
            gpu_runtime_class=env.get("MLOPT_GPU_RUNTIME_CLASS") or None,
            max_running=_int(env, "MLOPT_MAX_RUNNING", cls.max_running),
            max_running_per_namespace=_int(env, "MLOPT_MAX_RUNNING_PER_NAMESPACE", cls.max_running_per_namespace),
            metrics_port=_int(env, "MLOPT_METRICS_PORT", cls.metrics_port),
            namespace=env.get("POD_NAMESPACE") or cls.namespace,
            waits=Waits(
                failed_create=_int(env, "MLOPT_WAIT_FAILED_CREATE_SECONDS", defaults.failed_create),
                image=_int(env, "MLOPT_WAIT_IMAGE_SECONDS", defaults.image),
                unschedulable=_int(env, "MLOPT_WAIT_UNSCHEDULABLE_SECONDS", defaults.unschedulable),
            ),
        )
