"""The hardware profile: the one place that turns a CPU's flags into quantization choices.

INT8 kernels differ by instruction set. Without VNNI (AVX2, plain AVX-512) ONNX Runtime multiplies
uint8 activations by int8 weights with vpmaddubsw, whose 16-bit intermediate sums saturate when
both operands use their full range; the error is small per product and large over an LSTM's
time steps (the CRNN lost 4 points of argmax agreement with dynamic INT8 on an AVX2-only EPYC).
7-bit weights (`reduce_range`) keep the sums in range at no cost in speed there. VNNI and AMX
accumulate in 32 bits, so full 8-bit weights are both exact and the better choice. OpenVINO's CPU
kernels have the same 16-bit sums, and NNCF's `OverflowFix` is its 7-bit switch: `enable` quantizes
every Conv/MatMul weight to half the int8 range (its default, `first_layer_only`, only the first
convolutions), so it follows `reduce_range`.

`benchmark.profile` picks the class to optimize for when the models will serve on other nodes
than the one running mlopt; timings are still of this machine, and the results say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The one definition of "this CPU has 32-bit INT8 dot products" (/proc/cpuinfo flags): VNNI's and
# AMX's. compute.py, environment.py and select.py import these.
AMX_FLAG = "amx_int8"
VNNI_DOT_FLAGS = ("avx512_vnni", "avx_vnni")
VNNI_FLAGS = frozenset({*VNNI_DOT_FLAGS, AMX_FLAG})
ISA_CLASSES = ("avx2", "avx512", "avx-vnni", "avx512-vnni", "amx")
VNNI_CLASSES = ("avx-vnni", "avx512-vnni", "amx")  # the classes of ISA_CLASSES with VNNI_FLAGS
AMX_DEFAULT_EXTRAS = ("openvino-ort-qdq", "openvino-default")  # recipes the default set gains on AMX (resolve)


def isa_class(flags) -> str:
    """The instruction-set class of a CPU, most capable first."""
    flags = set(flags)
    if AMX_FLAG in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    if "avx512f" in flags or "avx512bw" in flags:
        return "avx512"
    return "avx2"


@dataclass(frozen=True)
class HardwareProfile:
    isa: str  # one of ISA_CLASSES, or cuda
    detected: str  # the class of the CPU this run is on
    chosen_by: str  # "detected" or "benchmark.profile"
    reduce_range: bool  # 7-bit INT8 weights for ORT's quantizers
    reasons: list[str] = field(default_factory=list)
    default_extras: tuple[str, ...] = ()  # recipes the default set gains on this class

    @property
    def vnni(self) -> bool:
        return self.isa in VNNI_CLASSES

    @property
    def overflow_fix(self) -> str:
        """NNCF's OverflowFix value (nncf.OverflowFix(...)): 7-bit weights wherever ORT's are."""
        return "enable" if self.reduce_range else "disable"

    def record(self) -> dict:
        return {"isa": self.isa, "detected": self.detected, "chosenBy": self.chosen_by,
                "reduceRange": self.reduce_range, "defaultExtras": list(self.default_extras),
                "reasons": list(self.reasons)}


def resolve(requested: str, flags, device: str = "cpu") -> HardwareProfile:
    """The profile to optimize for: `requested` (benchmark.profile) or, for auto, this CPU's."""
    detected = isa_class(flags)
    if device == "cuda":
        return HardwareProfile("cuda", detected, "detected", False,
                               ["CUDA: INT8 models are quantized for the GPU's tensor cores, full 8-bit weights"])
    isa, chosen_by = (detected, "detected") if requested == "auto" else (requested, "benchmark.profile")
    vnni = isa in VNNI_CLASSES
    reasons = []
    if chosen_by == "benchmark.profile" and isa != detected:
        reasons.append(f"optimized for {isa} (benchmark.profile) on a {detected} machine: the quantization "
                       "choices are for the target, the timings are of this machine")
    if vnni:
        reasons.append(f"{isa}: INT8 dot products accumulate in 32 bits, so weights use the full int8 range")
    else:
        reasons.append(f"{isa} without VNNI: uint8×int8 products are summed in 16 bits and can saturate, "
                       "so INT8 weights are 7-bit: ORT's reduce_range (static and dynamic alike) and "
                       "NNCF's overflow fix")
    extras: tuple[str, ...] = ()
    if isa == "amx":
        # Measured on a Xeon with AMX (1 thread, CRNN): OpenVINO ran mlopt's own QDQ model in 1.99 ms
        # against ONNX Runtime's 2.52 ms, and its bf16 default in 2.51 ms. On an AVX2 EPYC it lost
        # (14.0 ms vs 9.0 ms), so only AMX adds it to the default set.
        extras = AMX_DEFAULT_EXTRAS
        reasons.append("amx: OpenVINO's AMX kernels can beat ONNX Runtime here, so the default set adds "
                       "openvino-ort-qdq and openvino-default")
    return HardwareProfile(isa, detected, chosen_by, reduce_range=not vnni, reasons=reasons, default_extras=extras)
