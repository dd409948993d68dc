"""What the numbers were measured on: CPU (with the flags INT8 speed depends on) and versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

from optimizer.api.results import Environment
from optimizer.measure.hardware import AMX_FLAG, VNNI_DOT_FLAGS

# Flags that decide whether INT8 can beat FP32: VNNI/AMX (hardware.VNNI_FLAGS) give 4x the int8 dot-product rate.
INT8_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", *VNNI_DOT_FLAGS, "avx512_bf16",
              "amx_tile", AMX_FLAG, "amx_bf16")
PACKAGES = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "numpy", "mlopt")


def cpu_info() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model, flags = platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return model, [flag for flag in INT8_FLAGS if flag in flags]


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def describe(threads: int, device: str) -> Environment:
    import onnxruntime as ort

    cpu, flags = cpu_info()
    return Environment(
        cpu=cpu, cpuFlags=flags, python=platform.python_version(), packages=_versions(),
        threads=threads, device=device, availableProviders=ort.get_available_providers(),
        qosClass=os.environ.get("MLOPT_QOS_CLASS"),  # set by the operator's Job
    )
