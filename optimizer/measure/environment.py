"""What the numbers were measured on: CPU (with the flags INT8 speed depends on) and versions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from optimizer.api.results import Environment, GpuEnvironment
from optimizer.measure.hardware import AMX_FLAG, VNNI_DOT_FLAGS

# Flags that decide whether INT8 can beat FP32: VNNI/AMX (hardware.VNNI_FLAGS) give 4x the int8 dot-product rate.
INT8_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", *VNNI_DOT_FLAGS, "avx512_bf16",
              "amx_tile", AMX_FLAG, "amx_bf16")
PACKAGES = ("torch", "triton", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "numpy", "mlopt")


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


def _cgroup_cpu_limit() -> float | None:
    """The CPU quota of this process's cgroup in CPUs (a pod's cpu limit), or None without one."""
    try:  # cgroup v2: "max 100000" or "150000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: -1 means no quota
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, lowered to the cgroup quota (a pod's cpu limit of
    1.5 gives 1: a second thread would be throttled half the time), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = _cgroup_cpu_limit()
    return max(1, min(cpus, int(limit)) if limit else cpus)


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):  # "max" (no limit), or no such file
        return None


def available_memory() -> int | None:
    """Bytes this process may still allocate: the lower of the machine's MemAvailable and what its
    cgroup's limit (a pod's memory limit) leaves; None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes ~2^63 for no limit
            found.append(max(0, limit - usage))
    return min(found) if found else None


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version, from nvidia-smi (PyTorch does not report it); None without nvidia-smi."""
    command = shutil.which("nvidia-smi")
    if command is None:
        return None
    try:
        done = subprocess.run([command, "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip().splitlines() or [None])[0]


def gpu_record() -> GpuEnvironment | None:
    """The current CUDA device as PyTorch sees it; None when PyTorch sees no GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return GpuEnvironment(
        name=torch.cuda.get_device_name(index), capability=f"{properties.major}.{properties.minor}",
        memoryGiB=round(properties.total_memory / 2**30, 1), multiprocessors=properties.multi_processor_count,
        count=torch.cuda.device_count(), driver=nvidia_driver(), cuda=torch.version.cuda,
        cudnn=None if cudnn is None else str(cudnn), torch=torch.__version__,
        tf32={"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
    )


def describe(threads: int, device: str) -> Environment:
    import onnxruntime as ort

    cpu, flags = cpu_info()
    return Environment(
        cpu=cpu, cpuFlags=flags, python=platform.python_version(), packages=_versions(),
        threads=threads, device=device, availableProviders=ort.get_available_providers(),
        qosClass=os.environ.get("MLOPT_QOS_CLASS"),  # set by the operator's Job
        gpu=gpu_record() if device == "cuda" else None,
    )
