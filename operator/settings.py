"""Operator settings, from environment variables (the Deployment sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from optimizer import __version__


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

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        ttl = env.get("MLOPT_JOB_TTL_SECONDS")
        return cls(
            worker_image=env.get("MLOPT_WORKER_IMAGE") or cls.worker_image,
            gpu_worker_image=env.get("MLOPT_GPU_WORKER_IMAGE") or cls.gpu_worker_image,
            image_pull_policy=env.get("MLOPT_IMAGE_PULL_POLICY") or cls.image_pull_policy,
            job_ttl_seconds=int(ttl) if ttl else None,
            gpu_runtime_class=env.get("MLOPT_GPU_RUNTIME_CLASS") or None,
        )
