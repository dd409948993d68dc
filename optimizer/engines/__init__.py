"""The recipes the variants step builds: one recipe per way of making a model smaller or faster.

Each recipe is a small function `(BuildContext, VariantSpec) -> Built` registered under its
contract name (`optimizer.api.spec.Recipe`). "How is X made?" has exactly one answer: its module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from optimizer.api.errors import RecipeFailure
from optimizer.api.spec import AcceptanceSpec, Recipe, VariantSpec

if TYPE_CHECKING:
    from optimizer.console import Reporter
    from optimizer.engines.runners import Runner
    from optimizer.measure.hardware import HardwareProfile
    from optimizer.steps.data import Dataset
    from optimizer.steps.load import LoadedModel


# ONNX Runtime's calibrated (static INT8) recipes: the ones whose calibration method is a choice
# (compareCalibration) and whose nodes the accuracy fallback can keep in FP32 (excludeNodes).
CALIBRATED_RECIPES = (Recipe.ort_int8_static.value, Recipe.ort_int8_static_dynamic.value)


@dataclass(frozen=True)
class RecipeInfo:
    """What `mlopt recipes` says about a recipe; known without importing its engine."""

    engine: str
    devices: tuple[str, ...]  # where it applies; elsewhere the variant is skipped
    labels: str  # "no", "required" or "used if present"
    summary: str


_ORT, _TORCH_AO, _TORCHAO, _OPENVINO = "onnxruntime", "torch.ao", "torchao (PT2E)", "openvino"
_TORCH_CUDA = "pytorch (CUDA)"
RECIPE_INFO: dict[str, RecipeInfo] = {
    Recipe.onnx_fp32.value: RecipeInfo(_ORT, ("cpu", "cuda"), "no", "the verified ONNX export, ORT-optimized"),
    Recipe.ort_int8_dynamic.value: RecipeInfo(
        _ORT, ("cpu", "cuda"), "no", "quantize_dynamic on LSTM/GRU/MatMul/Gemm/Attention (Conv stays FP32)"),
    Recipe.ort_int8_static.value: RecipeInfo(
        _ORT, ("cpu", "cuda"), "no", "quantize_static, QDQ: per-channel int8 weights, uint8 activations, calibrated"),
    Recipe.ort_int8_static_dynamic.value: RecipeInfo(
        _ORT, ("cpu", "cuda"), "no", "static QDQ for conv/linear, then LSTM/GRU quantized dynamically"),
    Recipe.torch_int8_dynamic.value: RecipeInfo(
        _TORCH_AO, ("cpu",), "no", "dynamic quantization of Linear/LSTM/GRU (needs the model's class)"),
    Recipe.torch_int8_static.value: RecipeInfo(
        _TORCH_AO, ("cpu",), "no", "FX graph mode static quantization, Conv+BN+ReLU fused, calibrated"),
    Recipe.torch_int8_static_dynamic.value: RecipeInfo(
        _TORCH_AO, ("cpu",), "no", "FX static, then LSTM/GRU quantized dynamically"),
    Recipe.torch_int8_qat.value: RecipeInfo(
        _TORCH_AO, ("cpu",), "required", "quantization-aware training: FX fake-quant fine-tuning, then converted"),
    Recipe.torchao_pt2e_int8_static.value: RecipeInfo(
        _TORCHAO, ("cpu",), "no", "torch.export + X86InductorQuantizer, calibrated, run through torch.compile"),
    Recipe.torchao_pt2e_int8_dynamic.value: RecipeInfo(
        _TORCHAO, ("cpu",), "no", "the same with activations quantized per call (no calibration)"),
    Recipe.onnx_fp16.value: RecipeInfo(_ORT, ("cuda",), "no", "FP16 ONNX for the CUDA execution provider"),
    Recipe.openvino_fp32.value: RecipeInfo(_OPENVINO, ("cpu",), "no", "the export as OpenVINO IR, FP32 arithmetic"),
    Recipe.openvino_default.value: RecipeInfo(
        _OPENVINO, ("cpu",), "no", "the same IR at OpenVINO's default precision (bf16 where the CPU has it)"),
    Recipe.openvino_int8.value: RecipeInfo(
        _OPENVINO, ("cpu",), "used if present", "NNCF post-training INT8 (accuracy control with labelled data)"),
    Recipe.openvino_ort_qdq.value: RecipeInfo(
        _OPENVINO, ("cpu",), "no", "mlopt's ort-int8-static QDQ model compiled by OpenVINO"),
    Recipe.torch_fp16.value: RecipeInfo(
        _TORCH_CUDA, ("cuda",), "no", "weights and inputs cast to float16, saved as a torch.export .pt2"),
    Recipe.torch_bf16.value: RecipeInfo(
        _TORCH_CUDA, ("cuda",), "no", "weights and inputs cast to bfloat16, saved as a torch.export .pt2"),
    Recipe.torch_autocast_fp16.value: RecipeInfo(
        _TORCH_CUDA, ("cuda",), "no", "FP32 weights, run under torch.autocast(float16)"),
    Recipe.torch_autocast_bf16.value: RecipeInfo(
        _TORCH_CUDA, ("cuda",), "no", "FP32 weights, run under torch.autocast(bfloat16)"),
    Recipe.torch_compile.value: RecipeInfo(
        _TORCH_CUDA, ("cuda",), "no", "the torch.export program through torch.compile (inductor), compiled at build time"),
    Recipe.torch_compile_max_autotune.value: RecipeInfo(
        _TORCH_CUDA, ("cuda",), "no", "torch.compile mode max-autotune: autotuned kernels and CUDA graphs (minutes to build)"),
    Recipe.torch_cudagraphs.value: RecipeInfo(
        _TORCH_CUDA, ("cuda",), "no", "FP32 program captured once per input shape as a CUDA graph and replayed"),
    Recipe.torch_cudagraphs_fp16.value: RecipeInfo(
        _TORCH_CUDA, ("cuda",), "no", "the float16 program captured as a CUDA graph and replayed"),
    Recipe.ort_transformer_fp32.value: RecipeInfo(
        _ORT, ("cpu", "cuda"), "no", "transformers: ORT's transformer optimizer fuses attention, LayerNorm, Gelu"),
    Recipe.ort_transformer_int8_dynamic.value: RecipeInfo(
        _ORT, ("cpu", "cuda"), "no", "transformers: dynamic INT8 (MatMul, Attention) on the fused graph"),
    Recipe.ort_int4_weight_only.value: RecipeInfo(
        _ORT, ("cpu", "cuda"), "no", "MatMul-heavy models: 4-bit weight blocks (MatMulNBits, embeddings too), RTN"),
}


class NotApplicable(Exception):
    """The recipe does not apply to this model or device; the variant is recorded as skipped."""


__all__ = ["BuildContext", "Built", "NotApplicable", "RecipeFailure", "artifact_files", "registry"]


@dataclass
class BuildContext:
    loaded: LoadedModel
    fp32_onnx: Path | None  # the verified export (or the ONNX source)
    export_error: str | None  # why there is no fp32_onnx
    dataset: Dataset
    workdir: Path
    threads: int
    device: str
    hardware: HardwareProfile  # the quantization choices for the target CPU
    reporter: Reporter | None = None  # progress for calibration
    metric: str = "agreement"  # the resolved accuracy metric (QAT picks its loss from it)
    data_source: str = "random"  # data.source as used, for messages
    acceptance: AcceptanceSpec = field(default_factory=AcceptanceSpec)  # the budget (NNCF's accuracy control aims at it)
    cache: dict = field(default_factory=dict)  # shared intermediate files, e.g. the pre-processed model

    def require_onnx(self) -> Path:
        if self.fp32_onnx is None:
            raise RecipeFailure(f"needs the ONNX export, which failed: {self.export_error}")
        return self.fp32_onnx

    @property
    def external_data(self) -> bool:
        """Whether the FP32 model keeps its weights in external data: its variants do the same."""
        if "external_data" not in self.cache:
            from optimizer.artifacts import onnx_files

            self.cache["external_data"] = self.fp32_onnx is not None and onnx_files.has_external_data(self.fp32_onnx)
        return self.cache["external_data"]



@dataclass
class Built:
    runner: Runner
    artifact: Path
    parent: str
    options: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        """On disk, external data (ONNX) and weights (OpenVINO's .bin) included."""
        return sum(path.stat().st_size for path in artifact_files(self.artifact))


def artifact_files(artifact: Path) -> list[Path]:
    """A saved model's files, the model file first: ONNX external data, OpenVINO's .bin weights."""
    if artifact.suffix == ".onnx":
        from optimizer.artifacts import onnx_files

        return onnx_files.files(artifact)
    if artifact.suffix == ".xml":
        return [artifact, artifact.with_suffix(".bin")]
    return [artifact]


RecipeFunction = Callable[[BuildContext, VariantSpec], Built]


def registry() -> dict[str, RecipeFunction]:
    from optimizer.engines import openvino, ort, ort_transformers, qat, torch_ao, torch_cuda, torchao_pt2e

    return {
        Recipe.onnx_fp32.value: ort.onnx_fp32,
        Recipe.ort_int8_dynamic.value: ort.ort_int8_dynamic,
        Recipe.ort_int8_static.value: ort.ort_int8_static,
        Recipe.ort_int8_static_dynamic.value: ort.ort_int8_static_dynamic,
        Recipe.onnx_fp16.value: ort.onnx_fp16,
        Recipe.torch_int8_dynamic.value: torch_ao.torch_int8_dynamic,
        Recipe.torch_int8_static.value: torch_ao.torch_int8_static,
        Recipe.torch_int8_static_dynamic.value: torch_ao.torch_int8_static_dynamic,
        Recipe.torch_int8_qat.value: qat.torch_int8_qat,
        Recipe.torchao_pt2e_int8_static.value: torchao_pt2e.torchao_pt2e_int8_static,
        Recipe.torchao_pt2e_int8_dynamic.value: torchao_pt2e.torchao_pt2e_int8_dynamic,
        Recipe.openvino_fp32.value: openvino.openvino_fp32,
        Recipe.openvino_default.value: openvino.openvino_default,
        Recipe.openvino_int8.value: openvino.openvino_int8,
        Recipe.openvino_ort_qdq.value: openvino.openvino_ort_qdq,
        Recipe.ort_transformer_fp32.value: ort_transformers.ort_transformer_fp32,
        Recipe.ort_transformer_int8_dynamic.value: ort_transformers.ort_transformer_int8_dynamic,
        Recipe.ort_int4_weight_only.value: ort_transformers.ort_int4_weight_only,
        **dict.fromkeys(torch_cuda.PLANS, torch_cuda.torch_on_gpu),
    }
