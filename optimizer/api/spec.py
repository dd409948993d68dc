"""The ModelOptimization spec: the single source of truth.

The CLI validates YAML with these models, the CRD's OpenAPI schema is generated from them
(`optimizer.api.crd`), and their field descriptions become `kubectl explain` text. This module must
stay import-light (pydantic only): the operator image imports it without torch.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from optimizer.api import uris

API_VERSION = "mlopt.io/v1alpha1"
KIND = "ModelOptimization"

_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def dns_label(name: str, example: str) -> str:
    """`name` if Kubernetes accepts it as a DNS-1123 label (it names objects), else the rule."""
    if not _DNS1123.match(name):
        raise ValueError(f"use lower-case letters, digits and '-', e.g. {example}")
    return name
# package.module:Name, exactly one attribute after the colon: the loader imports the module and
# takes that one name, which must be a class or function defined there (never a chain of getattrs
# that ends in some other module's function, such as acme.models:torch.load).
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_ENTRYPOINT = re.compile(rf"^{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}$")


class _Strict(BaseModel):
    """Unknown fields are errors: a typo must never be silently ignored."""

    # validate_default: enum defaults become plain strings too, like values read from YAML.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_enum_values=True, validate_default=True)


class ModelFormat(str, Enum):
    auto = "auto"
    torchscript = "torchscript"
    exported_program = "exported-program"
    state_dict = "state-dict"
    onnx = "onnx"
    huggingface = "huggingface"


# A source whose name ends in a file suffix (.onnx, .pt, ...) is one model file; one without may be a
# Hugging Face save_pretrained folder, which brings its own inputs. The CRD's CEL rule says the same.
_FILE_SUFFIX = re.compile(r"\.[A-Za-z0-9]+$")


def may_be_folder(source: str) -> bool:
    """Whether model.source may name a Hugging Face folder (its inputs then come from its config)."""
    return not source.startswith(("zoo:", "https://")) and not _FILE_SUFFIX.search(source)


class Recipe(str, Enum):
    """Variant recipes. The names are the contract with users; never rename one."""

    onnx_fp32 = "onnx-fp32"
    ort_int8_dynamic = "ort-int8-dynamic"
    ort_int8_static = "ort-int8-static"
    ort_int8_static_dynamic = "ort-int8-static-dynamic"
    torch_int8_dynamic = "torch-int8-dynamic"
    torch_int8_static = "torch-int8-static"
    torch_int8_static_dynamic = "torch-int8-static-dynamic"
    torch_int8_qat = "torch-int8-qat"
    torchao_pt2e_int8_static = "torchao-pt2e-int8-static"
    torchao_pt2e_int8_dynamic = "torchao-pt2e-int8-dynamic"
    onnx_fp16 = "onnx-fp16"
    openvino_fp32 = "openvino-fp32"
    openvino_default = "openvino-default"
    openvino_int8 = "openvino-int8"
    openvino_ort_qdq = "openvino-ort-qdq"
    torch_fp16 = "torch-fp16"
    torch_bf16 = "torch-bf16"
    torch_autocast_fp16 = "torch-autocast-fp16"
    torch_autocast_bf16 = "torch-autocast-bf16"
    torch_compile = "torch-compile"
    torch_compile_max_autotune = "torch-compile-max-autotune"
    torch_cudagraphs = "torch-cudagraphs"
    torch_cudagraphs_fp16 = "torch-cudagraphs-fp16"
    ort_transformer_fp32 = "ort-transformer-fp32"
    ort_transformer_int8_dynamic = "ort-transformer-int8-dynamic"
    ort_int4_weight_only = "ort-int4-weight-only"


class Calibration(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    int64 = "int64"
    int32 = "int32"


class InputSpec(_Strict):
    name: str = Field(description="Input name, used as the ONNX graph input name.", min_length=1)
    shape: list[int] = Field(
        description="Example shape used for export and benchmarking, e.g. [1, 1, 32, 100].",
        min_length=1,
    )
    dtype: DType = Field(DType.float32, description="Element type of the input tensor.")
    dynamicAxes: dict[int, str] = Field(
        default_factory=dict,
        description="Axes that may change size at inference time, e.g. {0: batch, 3: width}. "
        "The exported model is checked at a second shape along these axes.",
    )
    valueRange: list[float] | None = Field(
        None,
        description="[low, high] of generated random values (defaults: [0, 1] for floats, "
        "[0, 100] for integers; integers include high).",
        min_length=2,
        max_length=2,
    )

    @field_validator("shape")
    @classmethod
    def _positive_dims(cls, shape: list[int]) -> list[int]:
        if any(dim < 1 for dim in shape):
            raise ValueError("every dimension must be a positive integer, e.g. [1, 1, 32, 100]")
        return shape

    @model_validator(mode="after")
    def _axes_inside_shape(self) -> "InputSpec":
        for axis in self.dynamicAxes:
            if not 0 <= axis < len(self.shape):
                raise ValueError(
                    f"dynamicAxes names axis {axis}, but shape {self.shape} has axes "
                    f"0..{len(self.shape) - 1}"
                )
        return self


class BoxFormat(str, Enum):
    xyxy = "xyxy"  # x1, y1, x2, y2
    cxcywh = "cxcywh"  # centre x, centre y, width, height
    xywh = "xywh"  # top-left x, y, width, height (COCO)


class DetectionSpec(_Strict):
    """A detector's outputs: which are boxes and scores, and how to turn them into detections."""

    boxesOutput: int = Field(0, ge=0, le=63, description="Index of the output with the boxes, [batch, candidates, 4] "
                             "(or [batch, candidates, 1, 4]).")
    scoresOutput: int = Field(1, ge=0, le=63, description="Index of the output with the per-class scores, "
                              "[batch, candidates, classes] (or [batch, candidates] for one class), already "
                              "probabilities (e.g. objectness × class probability).")
    boxFormat: BoxFormat = Field(BoxFormat.xyxy, description="How the boxes output (and labelled boxes in the "
                                 "data) are written: xyxy (x1, y1, x2, y2), cxcywh (centre, size) or xywh "
                                 "(top-left, size); any coordinate unit, the same for both.")
    scoreThreshold: float = Field(0.25, gt=0, lt=1, description="A candidate with a class score at least this is a "
                                  "detection: FP32's detections are the reference for box agreement.")
    iouThreshold: float = Field(0.45, gt=0, le=1, description="Non-maximum suppression (per class): a box "
                                "overlapping a higher-scored one of its class by more than this IoU is dropped.")
    maxDetections: int = Field(100, ge=1, le=10_000, description="Detections kept per image, highest scores first "
                               "(COCO's 100).")

    @model_validator(mode="after")
    def _distinct_outputs(self) -> "DetectionSpec":
        if self.boxesOutput == self.scoresOutput:
            raise ValueError(f"boxesOutput and scoresOutput are both {self.boxesOutput}: they name two different "
                             "outputs of the model (e.g. boxesOutput: 0, scoresOutput: 1)")
        return self


class ModelSpec(_Strict):
    source: str = Field(
        description="Where the model comes from: zoo:<name> (see `mlopt models`), s3://bucket/key, "
        "pvc://claim/path (cluster), https://..., file://... or a local path. One object (no trailing /); "
        "an ONNX model's external data files are fetched from beside it. A Hugging Face save_pretrained "
        "folder (config.json, model.safetensors, tokenizer files) is named without a trailing / too.",
        min_length=1,
        max_length=uris.MAX_URI_LENGTH,
    )
    format: ModelFormat = Field(
        ModelFormat.auto,
        description="auto (from the file suffix; a local or pvc:// folder, or an s3:// prefix, with config.json is huggingface), "
        "torchscript, exported-program (.pt2), state-dict (.pt/.pth/.safetensors, needs entrypoint), onnx, or "
        "huggingface: a save_pretrained folder whose architecture transformers builds from config.json (never "
        "the folder's own code), weights from safetensors only; its inputs come from the model unless "
        "model.inputs is set, and its config and tokenizer files are saved with the optimized models.",
    )
    entrypoint: str | None = Field(
        None,
        description="For state-dict models: the class (or function) that builds the network, as "
        "package.module:Name, defined in that module (not imported into it) and importable in the worker's "
        "environment.",
        max_length=512,
    )
    arguments: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments passed to the entrypoint class.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    sha256: str | None = Field(
        None,
        description="Expected SHA-256 of the model file; the run fails if it differs.",
        pattern=r"^[0-9a-f]{64}$",
    )
    maxSizeMB: int = Field(
        2048, description="Refuse model files larger than this (downloads included).", ge=1, le=1_048_576
    )
    inputs: list[InputSpec] | None = Field(
        None,
        description="The model's inputs. Optional for zoo models and Hugging Face folders (they declare "
        "their own; a folder's come from its forward signature and config, with dynamic batch and sequence).",
        min_length=1,
    )
    detection: DetectionSpec | None = Field(
        None,
        description="Set for a detector whose outputs are boxes and scores: mlopt then applies NMS and scores "
        "each variant's detections by mAP, against FP32's (box agreement, no labels) and against labelled "
        "boxes when the data has them. Zoo detectors declare their own.",
    )

    @field_validator("source")
    @classmethod
    def _source_rules(cls, source: str) -> str:
        uris.model_source(source)  # UriError (a ValueError): the loader names spec.model.source
        return source

    @model_validator(mode="after")
    def _entrypoint_rules(self) -> "ModelSpec":
        if self.format == ModelFormat.state_dict.value and not self.entrypoint:
            raise ValueError(
                "format state-dict needs entrypoint: set model.entrypoint to package.module:Class"
            )
        if self.entrypoint and not _ENTRYPOINT.match(self.entrypoint):
            raise ValueError(
                f"entrypoint {self.entrypoint!r} must look like package.module:Class, with one name after the "
                "colon (the class or function defined in that module)"
            )
        huggingface = self.format == ModelFormat.huggingface.value
        if not (self.source.startswith("zoo:") or self.inputs or huggingface or may_be_folder(self.source)):
            raise ValueError(
                "model.inputs is required for models outside the zoo and Hugging Face folders, e.g. "
                "[{name: image, shape: [1, 3, 224, 224]}]"
            )
        if huggingface and self.entrypoint:
            raise ValueError("format huggingface builds the architecture from the folder's config.json: remove "
                             "model.entrypoint")
        if huggingface and not may_be_folder(self.source):
            raise ValueError(f"format huggingface needs model.source to name a save_pretrained folder (a path, "
                             f"file://, pvc:// or s3:// prefix without a trailing /), not {self.source!r}: name the "
                             "folder, not a file in it (https:// cannot list a folder)")
        return self


class VariantSpec(_Strict):
    # The name becomes a file name (models/<name>.onnx) and an object key: no '/' or '..'.
    name: str = Field(description="Unique name of this variant in the results and of its file under models/: "
                      "letters, digits, '.', '_', '+', '-', starting with a letter or digit.",
                      min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    recipe: Recipe = Field(description="How the variant is made; see `mlopt recipes`.")
    calibration: Calibration = Field(
        Calibration.minmax,
        description="Static INT8 only: how activation ranges are calibrated.",
    )
    perChannel: bool = Field(True, description="Static INT8 only: per-channel weight scales.")
    opTypes: list[str] | None = Field(
        None,
        description="ONNX op types to quantize (ort-int8-dynamic defaults to "
        "LSTM, GRU, MatMul, Gemm, Attention: ConvInteger is slower than FP32 Conv on CPU).",
    )
    excludeNodes: list[str] = Field(
        default_factory=list,
        description="ONNX node names to keep in FP32 (ORT recipes). The accuracy fallback fills "
        "this in for you when a variant misses the budget.",
    )
    compareCalibration: bool = Field(
        False,
        description="Static INT8 only: build the variant once per calibration method (minmax, "
        "entropy, percentile) and report the accuracy of each.",
    )
    qatSteps: int = Field(
        100, ge=1, le=100_000, description="torch-int8-qat only: fine-tuning steps with fake quantization."
    )
    qatLearningRate: float = Field(
        1e-4, gt=0, description="torch-int8-qat only: learning rate of the fine-tuning."
    )
    blockSize: Literal[16, 32, 64, 128, 256] = Field(
        32, description="ort-int4-weight-only only: weights per 4-bit block (one scale each); smaller blocks keep "
        "more accuracy and cost size.")
    symmetric: bool = Field(True, description="ort-int4-weight-only only: symmetric blocks (no zero points).")
    accuracyLevel: Literal[0, 1, 2, 3, 4] = Field(
        4, description="ort-int4-weight-only only: MatMulNBits' accuracy_level; 4 runs the activations as int8 inside "
        "the kernel (fastest on CPU), 0 leaves it unset, 1/2/3 compute in FP32/FP16/BF16.")


class DataSpec(_Strict):
    source: str = Field(
        "random",
        description="Calibration and evaluation data: random, zoo:<dataset>, or a .npz file "
        "with one array per input name and an optional 'labels' array (a path, file://, s3://, "
        "pvc:// or https://). For a detector, labelled boxes are 'boxes' [samples, max_boxes, 4] "
        "(model.detection.boxFormat, padded rows ignored) with 'labels' [samples, max_boxes] class ids, "
        "-1 for padding.",
        min_length=1,
        max_length=uris.MAX_URI_LENGTH,
    )
    samples: int = Field(64, description="Samples used for calibration and evaluation.", ge=2, le=100_000)
    sha256: str | None = Field(
        None, description="Expected SHA-256 of the .npz file; the run fails if it differs.", pattern=r"^[0-9a-f]{64}$"
    )
    maxSizeMB: int = Field(4096, ge=1, le=1_048_576, description="Refuse data files larger than this, downloaded "
                           "or decompressed (a .npz's arrays together).")

    @field_validator("source")
    @classmethod
    def _source_rules(cls, source: str) -> str:
        uris.data_source(source)
        return source


class ServingSpec(_Strict):
    """The serving sweep: how many requests per second a pod sustains within a p99 latency bound."""

    enabled: bool | None = Field(
        None,
        description="Measure serving throughput for the best few variants: a concurrency sweep on the pod's "
        "CPUs that finds the highest requests/s whose p99 stays within latencySLOMs. Unset: on when "
        "spec.targets is given, off otherwise (the default local run stays as fast as before).",
    )
    latencySLOMs: float = Field(
        100.0, gt=0, le=600_000, description="The p99 latency bound of one request, in milliseconds (MLPerf's "
        "server scenario, perf_analyzer's --latency-threshold)."
    )
    variants: int = Field(3, ge=1, le=16, description="How many of the fastest accepted variants are swept.")
    maxConcurrency: int | None = Field(
        None, ge=1, le=256, description="Most requests in flight in the sweep; unset: twice the CPUs the pod sees."
    )
    secondsPerPoint: float = Field(
        2.0, gt=0, le=600, description="Seconds of load per point of the sweep (after a short warm-up)."
    )


class BenchmarkSpec(_Strict):
    device: Device = Field(Device.cpu, description="cpu or cuda.")
    threads: int = Field(1, description="Intra-op threads for every runtime.", ge=1, le=256)
    # Upper bounds keep one resource from holding a node until its deadline (10,000 runs of a
    # 100 ms model is 17 minutes per variant already).
    warmup: int = Field(10, description="Untimed runs before timing.", ge=0, le=1000)
    runs: int = Field(50, description="Timed runs per variant.", ge=1, le=10_000)
    rounds: int = Field(
        5,
        ge=1,
        le=100,
        description="The timed runs are split into this many rounds (at most runs), taken in turn "
        "across variants, so a slow patch on a shared machine hits every variant alike; "
        "1 times each variant's runs back to back.",
    )
    timeBudgetSeconds: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Most seconds of timed runs per variant, spread evenly over the rounds (each round runs at "
        "least once); warm-ups stop once they took a quarter of it. A 50 ms model never reaches the default; "
        "a 257 MB detector at a second per run stops at about 60 runs' worth instead of holding the run for "
        "hours. results.json records why each variant's timing stopped.",
    )
    targetPrecision: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Stop a variant's timing early (down to 2 runs per remaining round) once its mean is known to "
        "this relative precision: the 95% confidence half-width of the mean over its mean, e.g. 0.02 = ±2%. "
        "Off by default: every variant gets `runs`.",
    )
    tune: bool = Field(
        False,
        description="Search ONNX Runtime session options (threads, execution mode, optimization "
        "level) for the best variant and report the choice.",
    )
    scalingBatches: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1, 8, 32],
        description="Batch sizes for the scaling table (needs a dynamic axis 0); [] turns it off.",
        max_length=8,
    )
    scalingThreads: list[Annotated[int, Field(ge=1, le=256)]] = Field(
        default_factory=lambda: [1, 2], description="Thread counts for the scaling table.", max_length=8
    )
    scalingRuns: int = Field(3, ge=1, le=1000, description="Timed runs per scaling cell (after one warm-up).")
    profile: Literal["auto", "avx2", "avx512", "avx-vnni", "avx512-vnni", "amx"] = Field(
        "auto",
        description="CPU class to quantize for: auto (this machine's) or the class of the nodes that will "
        "serve the model (avx2 and avx512 get 7-bit INT8 weights, the VNNI/AMX classes full 8-bit). "
        "Timings are always of the machine that runs mlopt.",
    )
    serving: ServingSpec = Field(
        default_factory=ServingSpec, description="Serving throughput within a latency SLO (see spec.targets)."
    )


AccuracyMetric = Literal["top1", "char-accuracy", "exact-match", "agreement", "box-agreement", "map50", "map50-95"]
ACCURACY_METRICS: tuple[str, ...] = get_args(AccuracyMetric)  # every one "higher is better"
SEQUENCE_METRICS = ("char-accuracy", "exact-match")  # CTC text lines: labels padded with -1
DETECTION_METRICS = ("box-agreement", "map50", "map50-95")  # need model.detection
BOX_LABEL_METRICS = ("map50", "map50-95")  # labelled boxes: data 'boxes' + 'labels'
AGREEMENT_METRICS = ("agreement", "box-agreement")  # against the FP32 model, no labels
LABELLED_METRICS = tuple(m for m in ACCURACY_METRICS if m not in AGREEMENT_METRICS)
# Old metric names: a spec that still uses one fails with the new name (schema version 2 renamed cer).
RENAMED_METRICS = {"cer": ("char-accuracy", "the same number, 1 - character error rate: higher is better")}


class AcceptanceSpec(_Strict):
    metric: Literal["auto", AccuracyMetric] = Field(
        "auto",
        description="Accuracy metric, higher is better: top1 (class labels), char-accuracy (CTC text "
        "lines: 1 - character error rate), exact-match (whole text lines), agreement (with the "
        "FP32 model's argmax; no labels needed); for detectors (model.detection): box-agreement "
        "(mAP@0.5 of the variant's detections with FP32's as ground truth; no labels), map50 and "
        "map50-95 (COCO mAP@0.5 and mAP@0.5:0.95 against labelled boxes). auto = the zoo model's "
        "metric, else map50 or box-agreement for a detector, else top1 when the data has labels, "
        "else agreement.",
    )
    maxAccuracyDrop: float = Field(
        0.01,
        description="Largest accepted drop of accuracy against FP32 (absolute, 0.01 = 1 point). "
        "Without labels, accuracy is agreement with the FP32 model's argmax.",
        ge=0,
        le=1,
    )
    maxRelativeAccuracyDrop: float | None = Field(
        None,
        description="Largest accepted drop relative to FP32's accuracy (0.01 = 1% of it); "
        "when both are set, a variant must meet both.",
        ge=0,
        le=1,
    )
    fallback: bool = Field(
        True,
        description="When a static INT8 variant misses the budget, find the nodes whose "
        "quantization hurts most, keep them in FP32 and retry (each try is recorded).",
    )
    fallbackSeconds: int = Field(
        300, ge=1, le=86_400, description="Time budget for the fallback's retries, per variant."
    )

    @field_validator("metric", mode="before")
    @classmethod
    def _renamed_metric(cls, metric: Any) -> Any:
        if isinstance(metric, str) and metric in RENAMED_METRICS:
            new, what = RENAMED_METRICS[metric]
            raise ValueError(f"{metric!r} was renamed: use {new} ({what})")  # the loader names the field
        return metric


class Tolerance(_Strict):
    atol: float = Field(1e-4, ge=0, description="Absolute tolerance.")
    rtol: float = Field(1e-3, ge=0, description="Relative tolerance.")


class ExportSpec(_Strict):
    opset: int = Field(18, ge=11, le=23, description="ONNX opset of the exported model.")
    exporter: Literal["auto", "dynamo", "legacy"] = Field(
        "auto",
        description="auto tries torch.onnx's dynamo exporter and falls back to the legacy "
        "TorchScript exporter when the dynamo export fails or fails the parity check; for models "
        "with LSTM/GRU/RNN layers it tries the legacy one first (the dynamo exporter takes about a "
        "minute on them) and falls back to dynamo.",
    )
    tolerance: Tolerance = Field(
        default_factory=Tolerance, description="Parity check tolerance for every output."
    )
    outputTolerances: dict[str, Tolerance] = Field(
        default_factory=dict, description="Per-output tolerance overrides, by output name."
    )


class Toleration(_Strict):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


# Kubernetes' quantity grammar (resource.Quantity), less the leading sign no resource request uses.
QUANTITY = r"^(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?$"
_QUANTITY_SUFFIX = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
                    "E": 1e18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_value(text: str) -> float:
    """A Kubernetes quantity as a number ('500m' -> 0.5, '48Mi' -> 50331648); the spec's pattern checked
    the form. Written here because the spec stays pydantic-only (kubernetes.utils.parse_quantity
    would bring the whole client into the worker)."""
    match = re.match(QUANTITY, text)
    number, suffix = match.group(1), match.group(3) or ""
    if suffix[:1] in ("e", "E") and suffix[1:]:
        return float(number + suffix)  # '1e999' is inf, not an OverflowError
    return float(number) * _QUANTITY_SUFFIX[suffix]


class ResourceList(_Strict):
    cpu: str | None = Field(None, pattern=QUANTITY, description="e.g. '2' or '500m'.")
    memory: str | None = Field(None, pattern=QUANTITY, description="e.g. '4Gi'.")


class Resources(_Strict):
    requests: ResourceList = Field(
        default_factory=lambda: ResourceList(cpu="1", memory="2Gi"),
        description="Requested CPU and memory for the optimization pod; when not set and a limit is "
        "below the default (1 CPU, 2Gi), the request is the limit.",
    )
    limits: ResourceList = Field(
        default_factory=lambda: ResourceList(cpu="2", memory="8Gi"),
        description="CPU and memory limits for the optimization pod.",
    )

    @model_validator(mode="after")
    def _requests_within_limits(self) -> "Resources":
        """Kubernetes refuses a pod whose request exceeds its limit: say so here, naming the field,
        instead of a Job the API server rejects. A default request follows a lower limit down."""
        lowered = {}
        for resource in ("cpu", "memory"):
            request, limit = getattr(self.requests, resource), getattr(self.limits, resource)
            if request is None or limit is None or quantity_value(request) <= quantity_value(limit):
                continue
            if "requests" in self.model_fields_set:
                raise ValueError(f"requests.{resource} {request} is above limits.{resource} {limit}: a pod's request "
                                 f"cannot exceed its limit; lower requests.{resource} or raise limits.{resource}")
            lowered[resource] = limit
        if lowered:  # one assignment: it validates the model again, now within the limits
            self.requests = self.requests.model_copy(update=lowered)
        return self


class JobSpec(_Strict):
    """How the operator runs the optimization in the cluster (ignored by the local CLI)."""

    image: str | None = Field(
        None, description="Worker image; defaults to the operator's CPU or GPU worker image."
    )
    resources: Resources = Field(default_factory=Resources, description="Pod resources.")
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Pod tolerations.")
    activeDeadlineSeconds: int = Field(
        3600, ge=1, le=604_800, description="The Job is stopped after this many seconds (at most a week)."
    )
    backoffLimit: int = Field(0, ge=0, le=10, description="Retries of a failed pod.")
    serviceAccountName: str | None = Field(
        None,
        description="Service account for the worker pod, for workload identity (IRSA, GKE/Azure workload "
        "identity) instead of a Secret; its token is mounted only when this is set.",
    )
    priorityClassName: str | None = Field(
        None, description="PriorityClass of the worker pod; also orders the operator's queue (higher first).",
        max_length=253,
    )
    imagePullSecrets: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list, description="Secrets (names, in the resource's namespace) for pulling the worker image.",
        max_length=8,
    )
    qos: Literal["burstable", "guaranteed"] = Field(
        "burstable",
        description="guaranteed: requests = limits and whole CPUs, so the node gives the worker dedicated "
        "cores (with the static CPU manager) and latency numbers are not shared with neighbours; the "
        "class is recorded in results.json.",
    )
    queueName: str | None = Field(
        None,
        description="A Kueue LocalQueue: the Job is created suspended with kueue.x-k8s.io/queue-name and "
        "Kueue admits it; the operator's own cap does not apply to it.",
        max_length=63,
    )

    @model_validator(mode="after")
    def _guaranteed_needs_whole_cpus(self) -> "JobSpec":
        if self.qos == "guaranteed":
            cpu = self.resources.limits.cpu
            if cpu is None or self.resources.limits.memory is None:
                raise ValueError("qos guaranteed needs resources.limits.cpu and resources.limits.memory: "
                                 "requests are set to the limits")
            if not quantity_value(cpu).is_integer():
                raise ValueError(f"qos guaranteed needs whole CPUs: resources.limits.cpu is {cpu}; use e.g. '2'")
        return self


class ConfigMapKey(_Strict):
    name: str = Field(description="ConfigMap name, in the resource's namespace.", min_length=1)
    key: str = Field("ca.crt", description="Key that holds the PEM bundle (a file name in the pod).",
                     pattern=uris.CONFIGMAP_KEY, max_length=253)


class StorageSpec(_Strict):
    """How the worker reaches s3:// sources and outputs. Credentials never live in the resource."""

    secretRef: str | None = Field(
        None,
        description="Secret with the standard AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and optional "
        "AWS_SESSION_TOKEN) keys, given to the worker with envFrom; the operator never reads it. "
        "The local CLI reads the same variables from its environment.",
    )
    endpoint: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, Ceph, ...), e.g. https://minio.storage:9000; "
        "addressed path-style. Default: AWS (or AWS_ENDPOINT_URL).",
        pattern=r"^https?://",
    )
    region: str | None = Field(None, description="Region (default AWS_REGION, else us-east-1).")
    anonymous: bool = Field(False, description="Unsigned requests, for public buckets.")
    caBundle: ConfigMapKey | None = Field(
        None, description="A CA bundle for a private endpoint's certificate, from a ConfigMap."
    )


class TargetSpec(_Strict):
    """A node pool to measure on: what places a pod there and, optionally, what such a pod costs."""

    name: str = Field(
        description="The target's name, e.g. the node pool's (DNS-1123 label, at most 20 characters: it is "
        "part of the Job's name).", min_length=1, max_length=20,
    )
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector of this target.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Pod tolerations of this target.")
    resources: Resources = Field(
        default_factory=Resources, description="Pod resources on this target (else spec.job.resources)."
    )
    device: Device = Field(Device.cpu, description="cpu, or cuda for a GPU pool (requests nvidia.com/gpu).")
    pricePerHour: float | None = Field(
        None, gt=0, le=1_000_000,
        description="What one pod of this shape costs per hour (any currency, the same for every target). For a "
        "node's price, divide it by how many such pods fit on the node. With it, mlopt reports the cost per "
        "million inferences and, given spec.demand, the replicas and cost per hour.",
    )

    @field_validator("name")
    @classmethod
    def _dns_label(cls, name: str) -> str:
        return dns_label(name, "c7i-large")


class ModelOptimizationSpec(_Strict):
    model: ModelSpec = Field(description="The model to optimize.")
    variants: list[VariantSpec] | None = Field(
        None,
        description="Variants to build and measure; omitted = the recommended set for the device.",
        max_length=64,
    )
    data: DataSpec = Field(default_factory=DataSpec, description="Calibration/evaluation data.")
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec, description="Timing setup.")
    acceptance: AcceptanceSpec = Field(
        default_factory=AcceptanceSpec, description="Budget that the best variant must meet."
    )
    export: ExportSpec = Field(default_factory=ExportSpec, description="ONNX export settings.")
    output: str = Field(
        "mlopt-results",
        description="Where results.json, report.md, charts and models go: a local path, "
        "s3://bucket/prefix/ or pvc://claim/path/ (CLI: --output). In a cluster, omit it to keep "
        "only the status (the pod's files are then lost).",
        min_length=1,
        max_length=uris.MAX_URI_LENGTH,
    )
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Object-store access.")
    job: JobSpec = Field(default_factory=JobSpec, description="Cluster Job settings.")
    targets: list[TargetSpec] | None = Field(
        None,
        description="Node pools to measure on: one Job per target, each timing the variants on its own nodes, "
        "and a recommended (target, variant). Omitted: one Job wherever the scheduler puts it.",
        max_length=16,
    )
    demand: float | None = Field(
        None, gt=0, le=10_000_000,
        description="Requests per second to serve: with it, each target's replicas (and cost per hour, with "
        "pricePerHour) for the recommended variant.",
    )

    @field_validator("targets")
    @classmethod
    def _some_unique_targets(cls, targets: list[TargetSpec] | None) -> list[TargetSpec] | None:
        if targets is not None and not targets:
            raise ValueError("give at least one target, or leave targets out to measure where the Job runs")
        names = [t.name for t in targets or []]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target names must be unique; repeated: {', '.join(dupes)}")
        return targets

    @field_validator("output")
    @classmethod
    def _output_rules(cls, output: str) -> str:
        uris.output(output)
        return output

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, variants: list[VariantSpec] | None) -> list[VariantSpec] | None:
        names = [v.name for v in variants or []]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
        return variants


class Metadata(BaseModel):
    """Kubernetes object metadata; only `name` matters to the CLI, the rest is kept."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="Name of the optimization (DNS-1123 label).", max_length=63)

    @field_validator("name")
    @classmethod
    def _dns_label(cls, name: str) -> str:
        return dns_label(name, "crnn-int8")


class ModelOptimization(_Strict):
    apiVersion: Literal["mlopt.io/v1alpha1"] = Field(description="Always mlopt.io/v1alpha1.")
    kind: Literal["ModelOptimization"] = Field(description="Always ModelOptimization.")
    metadata: Metadata
    spec: ModelOptimizationSpec
    status: dict[str, Any] | None = Field(None, description="Written by the operator; ignored.")

    def serving_enabled(self) -> bool:
        """benchmark.serving.enabled, or, unset, whether targets are given."""
        enabled = self.spec.benchmark.serving.enabled
        return bool(self.spec.targets) if enabled is None else enabled

    def pod_resources(self, target: TargetSpec | None = None) -> Resources:
        """What the worker pod asks for: the target's resources when it gives them, else spec.job's
        (the operator's Job and the served InferenceService both follow this)."""
        if target is not None and "resources" in target.model_fields_set:
            return target.resources
        return self.spec.job.resources

    def target(self, name: str) -> TargetSpec:
        for target in self.spec.targets or []:
            if target.name == name:
                return target
        known = ", ".join(t.name for t in self.spec.targets or []) or "none"
        raise KeyError(f"no target named {name!r} in spec.targets (known: {known})")

    def variants(self) -> list[VariantSpec]:
        """The spec's variants, or the recommended set for its device."""
        if self.spec.variants:
            return self.spec.variants
        return default_variants(self.spec.benchmark.device)


RECOMMENDED: dict[str, list[Recipe]] = {
    Device.cpu.value: [
        Recipe.onnx_fp32,
        Recipe.ort_int8_dynamic,
        Recipe.ort_int8_static,
        Recipe.ort_int8_static_dynamic,
        Recipe.torch_int8_dynamic,
        Recipe.torch_int8_static,
        Recipe.torch_int8_static_dynamic,
        Recipe.onnx_fp16,
        Recipe.ort_transformer_fp32,  # skipped, with the reason, on models that are not transformers
        Recipe.ort_transformer_int8_dynamic,
        Recipe.ort_int4_weight_only,  # skipped on models whose weights are not mostly MatMul/embedding weights
    ],
    # On the GPU: ONNX Runtime's CUDA provider (where onnxruntime-gpu is installed) and PyTorch's own GPU
    # paths. No INT8: the CUDA provider has no DynamicQuantizeLSTM or ConvInteger kernel (those nodes would run
    # on the CPU, which the provider check refuses) and runs QDQ models as FP32 kernels between
    # Quantize/DequantizeLinear. torch-compile-max-autotune is opt-in: its autotuning takes minutes.
    Device.cuda.value: [
        Recipe.onnx_fp32,
        Recipe.onnx_fp16,
        Recipe.torch_fp16,
        Recipe.torch_bf16,
        Recipe.torch_autocast_fp16,
        Recipe.torch_autocast_bf16,
        Recipe.torch_compile,
        Recipe.torch_cudagraphs,
        Recipe.torch_cudagraphs_fp16,
    ],
}


def default_variants(device: str) -> list[VariantSpec]:
    return [VariantSpec(name=r.value, recipe=r) for r in RECOMMENDED[device]]
