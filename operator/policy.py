"""What a ModelOptimization may ask of the cluster, set by the platform team.

Creating a ModelOptimization makes the operator create a Job with the operator's own rights, so the
resource could otherwise ask for more than its author may do with Jobs: any image, a toleration of
every taint, a node's worth of memory, or (with `model.entrypoint`) importing code in the worker.
The policy lives in the ConfigMap `mlopt-policy` (key `policy.yaml`) in the operator's namespace; it
is read before every Job is created (cached a few seconds), so a change applies to the next resource
without a restart. Defaults are strict where a wrong default grants something (images, tolerations,
entrypoints) and generous where it only costs capacity (resources, deadline).
"""

from __future__ import annotations

import fnmatch
import time
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optimizer.api.spec import QUANTITY, ModelOptimization, quantity_value

from .settings import Settings

CONFIGMAP = "mlopt-policy"
KEY = "policy.yaml"
CACHE_SECONDS = 3


class Policy(BaseModel):
    """The rules; every field is optional in the ConfigMap (its default applies)."""

    model_config = ConfigDict(extra="forbid")

    allowedImages: list[str] = Field(
        default_factory=list,
        description="spec.job.image patterns (shell globs, e.g. registry.example.com/mlopt/*) besides the "
        "operator's worker images, which are always allowed.",
    )
    allowedTolerationKeys: list[str] = Field(
        default_factory=list,
        description="Taint keys (globs) user tolerations may name; a toleration without a key tolerates "
        "every taint and is allowed only by the pattern '*'. Default: none (GPU taints are tolerated by "
        "the operator itself for device: cuda).",
    )
    allowNodeSelector: bool = Field(True, description="Whether spec.job.nodeSelector may be set.")
    allowedPriorityClasses: list[str] = Field(
        default_factory=lambda: ["*"], description="spec.job.priorityClassName patterns."
    )
    maxCPU: str = Field("16", pattern=QUANTITY, description="Most CPUs a worker may request or be limited to.")
    maxMemory: str = Field("64Gi", pattern=QUANTITY, description="Most memory a worker may request or be limited to.")
    maxDeadlineSeconds: int = Field(86_400, ge=1, description="Largest spec.job.activeDeadlineSeconds.")
    allowedEntrypoints: list[str] = Field(
        default_factory=list,
        description="model.entrypoint patterns (e.g. 'acme.models.*:*') whose code the worker may import; "
        "default none: state-dict models need an entrypoint, TorchScript, .pt2 and ONNX models do not. An "
        "entrypoint is module:Name with one name, which the worker calls only if it is a class or function "
        "defined in that module under that name, so a pattern matches the real module and name of what runs "
        "(acme.models:load is refused when it is torch.load imported there).",
    )


def _allowed(value: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


def _placement(policy: Policy, where: str, tolerations: list[Any], node_selector: dict[str, str],
               resources: Any) -> list[str]:
    """The rules broken by what places one pod: its tolerations, nodeSelector and resources."""
    broken = []
    for index, toleration in enumerate(tolerations):
        key = toleration.key or ""
        # A key-less toleration tolerates every taint: only the literal '*' allows it.
        if not (_allowed(key, policy.allowedTolerationKeys) if key else "*" in policy.allowedTolerationKeys):
            what = f"key {key}" if key else f"operator {toleration.operator} with no key (tolerates every taint)"
            broken.append(f"allowedTolerationKeys: {where}.tolerations[{index}] ({what}) is not allowed"
                          + (f" (allowed keys: {', '.join(policy.allowedTolerationKeys)})" if policy.allowedTolerationKeys
                             else " (no user tolerations are allowed)"))
    if node_selector and not policy.allowNodeSelector:
        broken.append(f"allowNodeSelector: {where}.nodeSelector is not allowed")
    for kind in ("requests", "limits") if resources is not None else ():
        wanted = getattr(resources, kind)
        for name, most in (("cpu", policy.maxCPU), ("memory", policy.maxMemory)):
            value = getattr(wanted, name)
            if value is not None and quantity_value(value) > quantity_value(most):
                broken.append(f"max{'CPU' if name == 'cpu' else 'Memory'}: {where}.resources.{kind}.{name} "
                              f"{value} is over {most}")
    return broken


def violations(spec: ModelOptimization, policy: Policy, settings: Settings) -> list[str]:
    """Each rule the spec breaks, as '<policy field>: <what the spec asked>'; empty when allowed."""
    job, broken = spec.spec.job, []
    own = [settings.worker_image, settings.gpu_worker_image]
    if job.image and job.image not in own and not _allowed(job.image, policy.allowedImages):
        broken.append(f"allowedImages: spec.job.image {job.image} is not allowed (allowed: the worker images "
                      f"{', '.join(own)}" + (f"; {', '.join(policy.allowedImages)}" if policy.allowedImages else "")
                      + ")")
    broken += _placement(policy, "spec.job", job.tolerations, job.nodeSelector, job.resources)
    if job.priorityClassName and not _allowed(job.priorityClassName, policy.allowedPriorityClasses):
        broken.append(f"allowedPriorityClasses: spec.job.priorityClassName {job.priorityClassName} is not allowed")
    for index, target in enumerate(spec.spec.targets or []):
        # Each target's Job is checked as its pod will be: its own tolerations, nodeSelector and resources.
        # Resources only when the target gives them (else spec.job's, checked above, apply).
        given = target.resources if "resources" in target.model_fields_set else None
        broken += _placement(policy, f"spec.targets[{index}]", target.tolerations, target.nodeSelector, given)
    if job.activeDeadlineSeconds > policy.maxDeadlineSeconds:
        broken.append(f"maxDeadlineSeconds: spec.job.activeDeadlineSeconds {job.activeDeadlineSeconds} is over "
                      f"{policy.maxDeadlineSeconds}")
    entrypoint = spec.spec.model.entrypoint
    if entrypoint and not _allowed(entrypoint, policy.allowedEntrypoints):
        broken.append(f"allowedEntrypoints: model.entrypoint {entrypoint} may not be imported in the cluster"
                      + (f" (allowed: {', '.join(policy.allowedEntrypoints)})" if policy.allowedEntrypoints
                         else "; export the model to TorchScript, .pt2 or ONNX instead"))
    return broken


class PolicyUnreadable(Exception):
    """The ConfigMap exists but does not hold a valid policy: refuse to create Jobs until it is fixed."""


def parse(text: str | None) -> Policy:
    if not text:
        return Policy()
    try:
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise PolicyUnreadable(f"ConfigMap {CONFIGMAP} key {KEY} must be a mapping of policy fields")
        return Policy.model_validate(data)
    except yaml.YAMLError as error:
        raise PolicyUnreadable(f"ConfigMap {CONFIGMAP} key {KEY} is not YAML: {error}") from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        raise PolicyUnreadable(f"ConfigMap {CONFIGMAP} key {KEY}: {problems}") from None


class PolicySource:
    """The current policy from the ConfigMap, read at most every CACHE_SECONDS; a missing ConfigMap
    means the defaults."""

    def __init__(self, read: Callable[[], dict[str, Any] | None], clock: Callable[[], float] = time.monotonic):
        self._read, self._clock = read, clock
        self._cached: tuple[float, Policy] | None = None

    def current(self) -> Policy:
        now = self._clock()
        if self._cached and now - self._cached[0] < CACHE_SECONDS:
            return self._cached[1]
        configmap = self._read()
        policy = parse(((configmap or {}).get("data") or {}).get(KEY))
        self._cached = (now, policy)
        return policy
