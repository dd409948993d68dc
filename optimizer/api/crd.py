"""The ModelOptimization CustomResourceDefinition, generated from the spec model.

`python -m optimizer.api.crd > crds/modeloptimizations.mlopt.io.yaml` writes it; a test fails when the
committed file differs. Pydantic's JSON schema is turned into a structural OpenAPI v3 schema:
`$defs` inlined, `anyOf [X, null]` collapsed to X (an absent field means "use the default"),
titles and defaults dropped (the worker's pydantic applies defaults), descriptions kept for
`kubectl explain`. What a schema cannot say (cross-field rules) becomes CEL.
Torch-free: the operator image imports this module for the status model.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from optimizer.api import uris
from optimizer.api.spec import _ENTRYPOINT, API_VERSION, KIND, ModelOptimization

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "modeloptimizations"
SINGULAR = "modeloptimization"
SHORT_NAMES = ["mo"]
CATEGORIES = ["mlopt"]
CRD_NAME = f"{PLURAL}.{GROUP}"


# --- status: written by the operator only -------------------------------------------------------


class _Status(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LatencyStatus(_Status):
    p50: float = Field(description="Median latency in milliseconds.")
    mean: float = Field(description="Mean latency in milliseconds.")


class VariantStatus(_Status):
    name: str = Field(description="Variant name (the baseline is pytorch-fp32).")
    recipe: str = Field(description="Recipe that made the variant.")
    status: str = Field(description="ok, failed, rejected (outside the accuracy budget) or skipped.")
    sizeBytes: int | None = Field(None, description="Size of the saved model in bytes.")
    latencyMs: LatencyStatus | None = Field(None, description="Measured latency.")
    speedup: float | None = Field(None, description="Baseline mean latency / this mean latency.")
    accuracy: float | None = Field(None, description="Accuracy on the evaluation data (0..1).")
    argmaxAgreement: float | None = Field(
        None, description="Fidelity: share of samples whose argmax equals the FP32 model's."
    )
    error: str | None = Field(None, description="Why the variant failed, was rejected or skipped.")


class ArtifactStatus(_Status):
    uri: str = Field(description="Where the best variant's model file is stored.")
    sizeBytes: int = Field(description="Its size in bytes (external data files listed in results.json).")
    sha256: str = Field(description="Its SHA-256, to verify a download.")


class Condition(_Status):
    type: str = Field(description="Running, Succeeded or Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word saying why.")
    message: str = Field("", description="Details for people.")
    lastTransitionTime: str = Field(description="When status last changed (RFC 3339).")
    observedGeneration: int | None = Field(None, description="The spec generation this describes.")


class ServingStatus(_Status):
    variant: str | None = Field(None, description="The variant with the most requests/s within the SLO on this target.")
    requestsPerSecond: float | None = Field(None, description="Requests/s one pod sustains with p99 within the SLO.")
    p99Ms: float | None = Field(None, description="The p99 latency at that load, in milliseconds.")
    latencySLOMs: float | None = Field(None, description="The p99 bound (spec.benchmark.serving.latencySLOMs).")
    reason: str | None = Field(None, description="Why no variant met the SLO here.")


class _Costs(_Status):
    """optimizer.api.serving.price: what a target's pods cost (with spec.targets[].pricePerHour)."""

    pricePerHour: float | None = Field(None, description="spec.targets[].pricePerHour: one pod of this shape per hour.")
    costPerMillion: float | None = Field(None, description="pricePerHour / (requests/s x 3600) x 1e6.")
    replicas: int | None = Field(None, description="Pods needed for spec.demand at requests/s within the SLO.")
    costPerHour: float | None = Field(None, description="replicas x pricePerHour: what spec.demand costs there.")


class TargetStatus(_Costs):
    name: str = Field(description="The target's name (spec.targets[].name).")
    phase: Literal["Queued", "Pending", "Running", "Succeeded", "Failed"] | None = Field(
        None, description="This target's Job: Queued (waiting for a slot), Pending, Running, Succeeded or Failed."
    )
    reason: str | None = Field(None, description="Why it failed or waits (e.g. Unschedulable).")
    message: str | None = Field(None, description="What happened, for people (the scheduler's message, ...).")
    jobName: str | None = Field(None, description="The Job measuring on this target.")
    exitCode: int | None = Field(None, description="The worker's exit code, once it ended.")
    startTime: str | None = Field(None, description="When its Job started (RFC 3339).")
    completionTime: str | None = Field(None, description="When its Job ended (RFC 3339).")
    node: str | None = Field(None, description="The node its worker pod ran on.")
    cpu: str | None = Field(None, description="The CPU the worker saw there.")
    best: str | None = Field(None, description="The best variant on this target.")
    bestSize: str | None = Field(None, description="Its size, e.g. 7.9 MB.")
    bestLatency: str | None = Field(None, description="Its mean latency at batch 1, e.g. 4.02 ms.")
    bestSpeedup: str | None = Field(None, description="Its speedup, e.g. 6.07x.")
    baseline: VariantStatus | None = Field(None, description="The PyTorch FP32 model as measured here.")
    variants: list[VariantStatus] | None = Field(None, description="Every variant, as measured here.")
    results: str | None = Field(None, description="Where this target's results.json is stored.")
    output: str | None = Field(None, description="This target's output location, or why nothing was kept.")
    artifacts: dict[str, ArtifactStatus] | None = Field(None, description="Stored models by role.")
    serving: ServingStatus | None = Field(None, description="Serving throughput within the latency SLO here.")


class OfferStatus(_Costs):
    target: str = Field(description="The target.")
    variant: str | None = Field(None, description="Its best variant within the SLO; absent: none met it.")
    requestsPerSecond: float | None = Field(None, description="Requests/s per pod within the SLO.")
    p99Ms: float | None = Field(None, description="p99 latency at that load, in milliseconds.")
    lost: str | None = Field(None, description="Why it is not the recommendation; absent on the recommended one.")


class RecommendationStatus(_Status):
    target: str = Field(description="The target to serve on.")
    variant: str = Field(description="The variant to serve.")
    basis: str = Field(description="What decided: cost per hour at the demand, cost per million inferences, or "
                       "requests/s per pod.")
    demand: float | None = Field(None, description="spec.demand, requests/s.")
    offers: list[OfferStatus] | None = Field(None, description="Every finished target's offer, with why it lost.")


class ModelOptimizationStatus(_Status):
    phase: Literal["Queued", "Pending", "Running", "Succeeded", "Failed"] | None = Field(
        None, description="Queued (over the operator's cap, or waiting for Kueue), Pending, Running, Succeeded "
        "or Failed."
    )
    reason: str | None = Field(
        None,
        description="Why the run failed or waits: InvalidSpec, ModelLoadFailed, OOMKilled, "
        "DeadlineExceeded, BackoffLimitExceeded, ImagePullBackOff, ErrImageNeverPull, Unschedulable, "
        "ErrImagePull, CreateContainerConfigError, FailedCreate (the Job controller could not create the "
        "pod), JobRejected (the API server refused the Job), JobForbidden (e.g. a quota; retried), "
        "PolicyViolation (outside the cluster's mlopt-policy), PolicyUnreadable (that ConfigMap does not "
        "parse), OverCap (queued behind the operator's cap), WaitingForKueue, WorkerExited, ...",
    )
    queuePosition: int | None = Field(None, description="While Queued: 1 starts next.")
    message: str | None = Field(None, description="What happened, for people.")
    exitCode: int | None = Field(None, description="The worker's exit code, once it ended.")
    observedGeneration: int | None = Field(
        None, description="The spec generation this status describes."
    )
    jobName: str | None = Field(None, description="The Job running this generation.")
    startTime: str | None = Field(None, description="When the Job started (RFC 3339).")
    completionTime: str | None = Field(None, description="When the Job ended (RFC 3339).")
    best: str | None = Field(None, description="Name of the chosen variant.")
    bestSize: str | None = Field(None, description="The best variant's size, e.g. 7.9 MB.")
    bestLatency: str | None = Field(None, description="The best variant's mean latency, e.g. 4.02 ms.")
    bestSpeedup: str | None = Field(None, description="The best variant's speedup, e.g. 6.07x.")
    baseline: VariantStatus | None = Field(None, description="The PyTorch FP32 model as loaded.")
    variants: list[VariantStatus] | None = Field(None, description="Every variant, as measured.")
    results: str | None = Field(None, description="Where the full results.json is stored (s3://, pvc:// or a path).")
    output: str | None = Field(None, description="The output location (spec.output), or why nothing was kept.")
    artifacts: dict[str, ArtifactStatus] | None = Field(
        None, description="Stored models by role: `best` is the chosen variant's model file."
    )
    targets: list[TargetStatus] | None = Field(
        None, description="With spec.targets: one row per target, in the spec's order. The top-level results "
        "(best, baseline, variants, ...) are the recommended target's, else the first that succeeded."
    )
    recommendation: RecommendationStatus | None = Field(
        None, description="The (target, variant) that serves spec.demand within the SLO for least, from the "
        "targets finished so far (final once phase is Succeeded)."
    )
    recommended: str | None = Field(None, description="<target>/<variant> of the recommendation (a printer column).")
    conditions: list[Condition] | None = Field(
        None,
        description="Kubernetes-style conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


# --- JSON schema -> structural OpenAPI v3 ---------------------------------------------------------

# CEL rules where the schema cannot say it, by pydantic model name. Each message names the field
# and the fix, because `kubectl apply` prints it as is.
_RULES: dict[str, list[dict[str, str]]] = {
    "ModelSpec": [
        {
            "rule": "!has(self.format) || self.format != 'state-dict' || has(self.entrypoint)",
            "message": "model.entrypoint is required when model.format is state-dict: "
            "set it to package.module:Class",
        },
        {
            # spec.may_be_folder: a source without a file suffix may be a Hugging Face folder.
            "rule": "self.source.startsWith('zoo:') || has(self.inputs) || "
            "(has(self.format) && self.format == 'huggingface') || "
            "(!self.source.startsWith('https://') && !self.source.matches('[.][A-Za-z0-9]+$'))",
            "message": "model.inputs is required for models outside the zoo and Hugging Face folders, "
            "e.g. [{name: image, shape: [1, 3, 224, 224]}]",
        },
        {
            "rule": "!has(self.format) || self.format != 'huggingface' || !has(self.entrypoint)",
            "message": "format huggingface builds the architecture from the folder's config.json: "
            "remove model.entrypoint",
        },
        {
            "rule": "!has(self.format) || self.format != 'huggingface' || "
            "(!self.source.startsWith('https://') && !self.source.matches('[.][A-Za-z0-9]+$'))",
            "message": "format huggingface needs model.source to name a save_pretrained folder (a path, file://, "
            "pvc:// or s3:// prefix without a trailing /), not a file in it",
        },
    ],
    "InputSpec": [
        {
            "rule": "!has(self.dynamicAxes) || self.dynamicAxes.all(k, k.matches('^[0-9]+$') "
            "&& int(k) < size(self.shape))",
            "message": "model.inputs[].dynamicAxes keys must be axis numbers of shape, "
            "e.g. {0: batch} for shape [1, 3, 224, 224]",
        },
    ],
}

# Schema details that pydantic validators enforce in code, stated here for the API server.
_FIELD_EXTRAS: dict[tuple[str, str], dict[str, Any]] = {
    ("ModelSpec", "entrypoint"): {"pattern": _ENTRYPOINT.pattern},
    # The URI rules of optimizer/api/uris.py that CEL can express.
    ("ModelSpec", "source"): {"x-kubernetes-validations": uris.CEL_MODEL_SOURCE},
    ("DataSpec", "source"): {"x-kubernetes-validations": uris.CEL_DATA_SOURCE},
    ("ModelOptimizationSpec", "output"): {"x-kubernetes-validations": uris.CEL_OUTPUT},
    ("InputSpec", "shape"): {"items": {"type": "integer", "minimum": 1}, "maxItems": 8},
    # The API server refuses CEL rules over unbounded lists and maps (their estimated cost is too
    # high), so the inputs' rule needs these bounds; they are generous for real models.
    ("ModelSpec", "inputs"): {"maxItems": 16},
    ("InputSpec", "dynamicAxes"): {"maxProperties": 8},
    # Unique variant names, enforced by the API server without a quadratic CEL rule.
    ("ModelOptimizationSpec", "variants"): {
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
    },
}

_DROP = {"title", "default", "additionalProperties", "const", "$defs"}


def _structural(schema: dict[str, Any], defs: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    if "$ref" in schema:
        name = schema.pop("$ref").rsplit("/", 1)[-1]
        merged = {**defs[name], **schema}  # the use site's description wins
        return _structural(merged, defs, name)
    if "anyOf" in schema:
        options = [s for s in schema.pop("anyOf") if s.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {options} structurally")
        return _structural({**options[0], **schema}, defs, owner)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROP or key.startswith("x-") and key != "x-kubernetes-preserve-unknown-fields":
            continue
        out[key] = value
    for key in ("x-kubernetes-list-type", "x-kubernetes-list-map-keys"):
        if key in schema:
            out[key] = schema[key]
    if "const" in schema:
        out["enum"] = [schema["const"]]
    # JSON Schema 2020 (pydantic) writes exclusive bounds as numbers; OpenAPI v3 (the API server)
    # wants the bound in minimum/maximum and a boolean flag.
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(out.get(flag), (int, float)) and not isinstance(out[flag], bool):
            out[bound], out[flag] = out[flag], True
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("properties", None)
    elif isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(schema["additionalProperties"], defs)
    if "properties" in schema:
        out["properties"] = {}
        for field, sub in schema["properties"].items():
            converted = _structural(sub, defs)
            converted.update(copy.deepcopy(_FIELD_EXTRAS.get((owner, field), {})))
            out["properties"][field] = converted
    if "items" in out:
        out["items"] = _structural(out["items"], defs)
    if owner in _RULES:
        out["x-kubernetes-validations"] = copy.deepcopy(_RULES[owner])
    return _ordered(out)


def _ordered(schema: dict[str, Any]) -> dict[str, Any]:
    """type and description first, so the generated YAML reads like a hand-written CRD."""
    first = {k: schema[k] for k in ("type", "description") if k in schema}
    return {**first, **{k: v for k, v in schema.items() if k not in first}}


def spec_schema() -> dict[str, Any]:
    raw = ModelOptimization.model_json_schema()
    defs = raw.get("$defs", {})
    spec = _structural(raw["properties"]["spec"], defs)
    raw_status = ModelOptimizationStatus.model_json_schema()
    status = _structural(raw_status, raw_status.get("$defs", {}))
    status["description"] = "What the operator observed; written by the operator only."
    spec["description"] = "What to optimize and how; see `mlopt validate` for the same checks locally."
    schema = {
        "type": "object",
        "description": "A PyTorch model to make smaller and faster: the operator runs one Job per "
        "spec generation and writes the measured variants and the best one into status.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "Always mlopt.io/v1alpha1."},
            "kind": {"type": "string", "description": "Always ModelOptimization."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        # The name becomes a label value (63 characters at most): refuse a longer one at apply time,
        # naming the field, instead of a Job the API server would refuse later. CEL at the root may
        # read metadata.name.
        "x-kubernetes-validations": [{
            "rule": "self.metadata.name.size() <= 63",
            "message": "metadata.name must be at most 63 characters (it names the Job and labels its pods); "
            "use a shorter name",
        }],
    }
    return schema


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Best", "type": "string", "jsonPath": ".status.best"},
    {"name": "Size", "type": "string", "jsonPath": ".status.bestSize"},
    {"name": "Latency", "type": "string", "jsonPath": ".status.bestLatency"},
    {"name": "Speedup", "type": "string", "jsonPath": ".status.bestSpeedup"},
    {"name": "Recommended", "type": "string", "jsonPath": ".status.recommended"},  # empty without spec.targets
    {"name": "Output", "type": "string", "jsonPath": ".status.output", "priority": 1},  # kubectl get -o wide
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": spec_schema()},
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m optimizer.api.crd` from optimizer/api/spec.py; do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render())
