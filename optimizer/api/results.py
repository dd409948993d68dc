"""results.json: the one versioned record of a run. Status, report, table and charts project it.

Torch-free on purpose: the operator reads the worker's summary with these models.
"""

from __future__ import annotations

import json
import os
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 2  # 2: accuracyMetric "cer" (which held 1 − CER) is now "char-accuracy"
BASELINE_NAME = "pytorch-fp32"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class VariantStatus(str, Enum):
    ok = "ok"  # built, verified, measured and within the acceptance budget
    failed = "failed"  # could not be built, exported or verified; `error` says why
    rejected = "rejected"  # measured, but outside the accuracy budget; `error` says by how much
    skipped = "skipped"  # not applicable here (e.g. FP16 on CPU); `error` says why


class Latency(_Record):
    mean: float
    std: float
    p50: float
    p90: float
    p99: float
    runs: int
    rounds: int = 1  # the runs were taken in this many rounds, interleaved with the other variants'
    roundMeans: list[float] = Field(default_factory=list)  # mean of each round, in order
    precision: float | None = None  # 95% confidence half-width of the mean / the mean (Student's t)
    stoppedBy: str = "runs"  # runs: all benchmark.runs; timeBudget: timeBudgetSeconds spent; targetPrecision: precise enough


class Fidelity(_Record):
    maxAbsDiff: float
    cosine: float
    argmaxAgreement: float


class BoxScores(_Record):
    """COCO mAP of one variant's detections against one ground truth."""

    map50: float
    map50_95: float


class DetectionRecord(_Record):
    """A detector's variant (model.detection): its boxes against FP32's and, with labelled data, against the labels."""

    vsFp32: BoxScores  # FP32's detections at scoreThreshold as ground truth ("box agreement")
    vsLabels: BoxScores | None = None
    detectionsPerImage: float  # at scoreThreshold, after NMS


class Lineage(_Record):
    """Where a variant came from, so any number can be reproduced (Olive's 'footprint')."""

    parent: str
    recipe: str
    options: dict[str, Any] = Field(default_factory=dict)


class FallbackTry(_Record):
    """One retry of the accuracy fallback: which nodes stayed FP32 and what that gave."""

    excludedNodes: list[str]
    accuracy: float | None = None
    sizeBytes: int | None = None
    seconds: float
    withinBudget: bool = False
    error: str | None = None


class Fallback(_Record):
    """The accuracy fallback of a rejected variant: the nodes ranked by sensitivity, and each try."""

    ranking: list[dict[str, Any]] = Field(default_factory=list)  # [{node, opType, sqnrDropDb}], worst first
    tries: list[FallbackTry] = Field(default_factory=list)
    excludedNodes: list[str] = Field(default_factory=list)  # of the recovered variant; [] when not recovered
    recovered: bool = False
    variant: str | None = None  # name of the recovered variant (<name>+fallback)
    seconds: float = 0.0
    reason: str | None = None  # why it stopped without recovering


class VariantResult(_Record):
    name: str
    recipe: str
    status: VariantStatus
    runtime: str | None = None  # "onnxruntime" or "pytorch"
    provider: str | None = None  # the execution provider actually bound
    sizeBytes: int | None = None
    latencyMs: Latency | None = None
    speedup: float | None = None  # baseline mean latency / this mean latency
    speedupRange: list[float] | None = None  # [lowest, highest] of the per-round speedups (same round, same moment)
    fidelity: Fidelity | None = None
    accuracy: float | None = None
    detection: DetectionRecord | None = None  # detectors only: box mAP against FP32 and labels
    peakMemoryBytes: int | None = None  # the process's peak RSS above its RSS before, while built, evaluated and timed
    artifact: str | None = None  # path of the saved model, relative to the output dir
    artifactFiles: list[str] = Field(default_factory=list)  # its ONNX external data files, beside it
    opCounts: dict[str, int] = Field(default_factory=dict)  # ONNX ops after ORT optimization
    lineage: Lineage | None = None
    notes: list[str] = Field(default_factory=list)  # warnings a user should read
    error: str | None = None
    fallback: Fallback | None = None  # set on a variant the accuracy fallback retried
    calibrationOf: str | None = None  # compareCalibration: the spec variant this one was expanded from


class EvaluationSize(_Record):
    """What the accuracy verdict rests on: how many decisions, and what one flipped decision weighs."""

    items: int  # held-out evaluation items (model calls)
    decisions: int  # argmax decisions of the first output over them: what agreement and top-1 count
    oneDecision: float  # the accuracy one flipped decision moves (1 / decisions)
    budget: float | None = None  # the tightest accuracy budget, absolute
    sizedFromBudget: bool = False  # data.samples unset: the held-out split was sized so one flip <= budget / 4


def baseline_label(baseline: VariantResult) -> str:
    """The baseline as a person reads it: PyTorch FP32, or the user's own ONNX model in ONNX Runtime."""
    return "PyTorch FP32" if baseline.recipe == BASELINE_NAME else "your ONNX model in ONNX Runtime (FP32)"


class StepTiming(_Record):
    step: str
    seconds: float


class GpuEnvironment(_Record):
    """The GPU a CUDA run measured on, as PyTorch (and nvidia-smi) report it."""

    name: str  # torch.cuda.get_device_name, e.g. "NVIDIA H200"
    capability: str  # compute capability, e.g. "9.0"
    memoryGiB: float
    multiprocessors: int
    count: int  # GPUs PyTorch sees; the run uses the current one
    driver: str | None = None  # NVIDIA driver version from nvidia-smi; None where nvidia-smi is not available
    cuda: str | None  # the CUDA runtime PyTorch was built with (torch.version.cuda)
    cudnn: str | None  # torch.backends.cudnn.version()
    torch: str
    tf32: dict[str, bool]  # {cudnn, matmul}: whether FP32 convolutions / matmuls may use TF32 tensor cores


class Environment(_Record):
    cpu: str
    cpuFlags: list[str]
    python: str
    packages: dict[str, str]
    threads: int
    device: str
    availableProviders: list[str]
    hardware: dict[str, Any] | None = None  # optimizer.measure.hardware.HardwareProfile.record(): the choices and why
    qosClass: str | None = None  # the worker pod's QoS class in a cluster (Guaranteed: dedicated cores)
    gpu: GpuEnvironment | None = None  # device cuda: the GPU the numbers came from; None on the CPU


class Analysis(_Record):
    """Why the numbers are what they are: arithmetic, time per op type, scaling, tuning."""

    compute: dict[str, Any] | None = None  # MACs by layer type, clock, FP32/INT8 limits, best's fraction
    profiledVariant: str | None = None
    profile: list[dict[str, Any]] = Field(default_factory=list)  # [{op, ms, share}]
    scaling: list[dict[str, Any]] = Field(default_factory=list)  # [{variant, batch, threads, latencyMs, throughput}]
    tuning: dict[str, Any] | None = None  # {variant, chosen, tried}
    notes: list[str] = Field(default_factory=list)


class ServingPoint(_Record):
    """One point of the serving sweep: this many requests in flight, each stream with these threads."""

    concurrency: int  # requests in flight (one per stream / session call in parallel)
    threadsPerStream: int
    batch: int = 1  # requests merged per model call (dynamic batching), where the model allows
    requestsPerSecond: float
    meanMs: float
    p50Ms: float
    p90Ms: float
    p99Ms: float
    requests: int  # completed during the point
    stable: bool = True  # its last 3 windows agreed within 10% (perf_analyzer's rule); False: taken as they were


class ServingCurve(_Record):
    """One variant's sweep: throughput against p99, and the best point within the SLO."""

    variant: str
    points: list[ServingPoint] = Field(default_factory=list)
    atSLO: ServingPoint | None = None  # the highest requests/s whose p99 <= latencySLOMs
    reason: str | None = None  # why no point met the SLO ("cannot meet: …")


class Serving(_Record):
    """benchmark.serving: what this pod sustains within the latency SLO."""

    latencySLOMs: float
    cpus: int  # CPUs the pod (this process) may run on
    curves: list[ServingCurve] = Field(default_factory=list)
    variant: str | None = None  # the variant with the most requests/s at the SLO
    requestsPerSecond: float | None = None
    p99Ms: float | None = None
    reason: str | None = None  # why none met the SLO
    notes: list[str] = Field(default_factory=list)  # what bounded the sweep, e.g. streams capped by memory


class ServingOffer(_Record):
    """One (target, variant): what it sustains within the SLO and, with a price, what it costs."""

    target: str
    variant: str | None
    requestsPerSecond: float | None  # per pod, at the SLO; None: cannot meet it
    p99Ms: float | None = None
    pricePerHour: float | None = None  # of one pod of the target's shape
    costPerMillion: float | None = None  # pricePerHour / (requestsPerSecond * 3600) * 1e6
    replicas: int | None = None  # ceil(demand / requestsPerSecond)
    costPerHour: float | None = None  # replicas * pricePerHour
    lost: str | None = None  # why it is not the recommendation; None on the recommended one


class Recommendation(_Record):
    """The (target, variant) to serve, what decided it, and every offer with why it lost."""

    target: str
    variant: str
    basis: str  # "cost per hour at the demand" | "cost per million inferences" | "requests/s per pod"
    demand: float | None = None
    offers: list[ServingOffer] = Field(default_factory=list)


class Results(_Record):
    schemaVersion: int = SCHEMA_VERSION
    name: str
    model: dict[str, Any]
    accuracyMetric: str
    accuracyBudget: dict[str, float | None] | None = None  # {maxAccuracyDrop, maxRelativeAccuracyDrop}
    dataset: str
    evaluation: EvaluationSize | None = None
    baseline: VariantResult
    variants: list[VariantResult]
    best: str | None
    bestReason: str
    environment: Environment
    analysis: Analysis = Field(default_factory=Analysis)
    steps: list[StepTiming] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)  # from the libraries (exporters, quantizers), with counts
    outputs: list[dict[str, Any]] = Field(default_factory=list)  # [{path, sizeBytes, sha256}]: every other file
    target: str | None = None  # spec.targets' name this run measured (a target's Job); None: wherever it ran
    serving: Serving | None = None  # benchmark.serving: throughput within the latency SLO on this pod
    recommendation: Recommendation | None = None  # from this run's serving figures (one target)

    def variant(self, name: str) -> VariantResult:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(name)


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Readers never see a half-written file: write a sibling temp file, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results(path: Path) -> Results:
    return Results.model_validate_json(Path(path).read_text())
