"""How much arithmetic a model does, and what that implies for the fastest possible latency.

Multiply-accumulates are counted with forward hooks on the layers that dominate (Conv, Linear,
LSTM, GRU) at the declared input. Two limits follow from them:
- nominal: MACs / (MACs per cycle from the CPU's flags × the clock in /proc/cpuinfo). Cloud VMs
  report the base clock while the core boosts, so this limit can be slower than what runs;
- measured: MACs / the rate ONNX Runtime's own FP32 and INT8 GEMM kernels reach here on a large
  matrix product at the benchmark's thread count: the practical ceiling for conv and matmul layers.
Per layer type, the op-time profile of the best variant then says how close each gets to it.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from optimizer.runtime import session_options

# Per core per cycle, for the common x86 cases (two FMA/dot-product pipes).
FP32_MACS_PER_CYCLE = {"avx512f": 16, "avx2": 16}  # Zen 4 double-pumps AVX-512: same as 2×AVX2 FMA
INT8_MACS_PER_CYCLE = {"amx_int8": 1024, "avx512_vnni": 64, "avx_vnni": 64, "avx2": 32}

# The ONNX Runtime op types (after its graph optimizations) that run each counted layer type.
RUNS_AS = {
    "Conv": {"Conv", "FusedConv", "NhwcFusedConv", "QLinearConv", "ConvInteger"},
    "LSTM": {"LSTM", "DynamicQuantizeLSTM"},
    "GRU": {"GRU"},
    "Linear": {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "QLinearMatMul", "QGemm", "MatMulInteger",
               "DynamicQuantizeMatMul", "MatMulIntegerToFloat"},
}
INT8_OPS = {"QLinearConv", "ConvInteger", "DynamicQuantizeLSTM", "QLinearMatMul", "QGemm", "MatMulInteger",
            "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
GEMM_SHAPE = (128, 1024, 512)  # M, K, N: conv-sized, at the kernels' peak; 0.1 s per precision


def count_macs(module, feed: dict, input_names: list[str]) -> dict[str, int]:
    """MACs per layer type for one call on `feed`; empty if the module takes no hooks."""
    import torch

    counts: Counter = Counter()

    def conv(layer, inputs, output):
        kernel = layer.weight[0].numel()  # in_channels/groups × kernel area
        counts["Conv"] += output.numel() * kernel

    def linear(layer, inputs, output):
        counts["Linear"] += output.numel() * layer.in_features

    def recurrent(layer, inputs, output):
        gates = {"LSTM": 4, "GRU": 3}[type(layer).__name__]
        sequence = output[0]
        steps = sequence.shape[0] * sequence.shape[1]  # time × batch (either layout)
        directions = 2 if layer.bidirectional else 1
        per_step = 0
        for index in range(layer.num_layers):
            in_size = layer.input_size if index == 0 else layer.hidden_size * directions
            per_step += gates * layer.hidden_size * (in_size + layer.hidden_size) * directions
        counts[type(layer).__name__] += steps * per_step

    hooks_for = {torch.nn.Conv1d: conv, torch.nn.Conv2d: conv, torch.nn.Linear: linear,
                 torch.nn.LSTM: recurrent, torch.nn.GRU: recurrent}
    if not hasattr(module, "modules") or isinstance(module, torch.jit.ScriptModule):
        return {}
    handles = [m.register_forward_hook(hooks_for[type(m)]) for m in module.modules() if type(m) in hooks_for]
    try:
        with torch.inference_mode():
            module(*(torch.from_numpy(feed[name]) for name in input_names))
    finally:
        for handle in handles:
            handle.remove()
    return dict(counts)


def clock_ghz() -> float | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000.0
    except (OSError, ValueError):
        pass
    return None


def _rate(table: dict[str, int], flags: set[str]) -> int | None:
    return next((rate for flag, rate in table.items() if flag in flags), None)


def compute_limits(macs: int, flags: list[str], ghz: float | None) -> dict:
    """Lower bounds on one-core latency at the FP32 and INT8 peak rates (None when unknown)."""
    flag_set = set(flags)
    limits = {"macs": macs, "clockGHz": ghz, "fp32MacsPerCycle": _rate(FP32_MACS_PER_CYCLE, flag_set),
              "int8MacsPerCycle": _rate(INT8_MACS_PER_CYCLE, flag_set)}
    for key, rate in (("fp32LimitMs", limits["fp32MacsPerCycle"]), ("int8LimitMs", limits["int8MacsPerCycle"])):
        limits[key] = macs / (rate * ghz * 1e9) * 1000.0 if rate and ghz else None
    return limits


def _gemm_session(op: str, weights: np.ndarray, input_type: int, output_type: int, threads: int):
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    m, k, _ = GEMM_SHAPE
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])], "gemm_peak",
        [helper.make_tensor_value_info("a", input_type, [m, k])],
        [helper.make_tensor_value_info("y", output_type, None)],
        [numpy_helper.from_array(weights, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])


def _fastest_seconds(session, feed: dict, budget_s: float) -> float:
    """The fastest run within `budget_s` (at least 10 runs): a peak rate is what the kernel reaches,
    and a shared machine's noise only ever slows it down."""
    for _ in range(2):
        session.run(None, feed)
    fastest, spent, count = float("inf"), 0.0, 0
    while spent < budget_s or count < 10:
        start = time.perf_counter()
        session.run(None, feed)
        elapsed = time.perf_counter() - start
        fastest, spent, count = min(fastest, elapsed), spent + elapsed, count + 1
    return fastest


def gemm_peaks(threads: int, budget_s: float = 0.1) -> dict:
    """MACs per second of ONNX Runtime's FP32 (MatMul) and INT8 (MatMulInteger, u8×s8) CPU kernels."""
    from onnx import TensorProto

    m, k, n = GEMM_SHAPE
    rng = np.random.default_rng(0)
    fp32 = _gemm_session("MatMul", rng.standard_normal((k, n), dtype=np.float32),
                         TensorProto.FLOAT, TensorProto.FLOAT, threads)
    int8 = _gemm_session("MatMulInteger", rng.integers(-128, 128, (k, n), dtype=np.int8),
                         TensorProto.UINT8, TensorProto.INT32, threads)
    macs = m * k * n
    return {
        "gemm": f"{m}x{k}x{n}", "threads": threads,
        "fp32MacsPerS": macs / _fastest_seconds(fp32, {"a": rng.standard_normal((m, k), dtype=np.float32)}, budget_s),
        "int8MacsPerS": macs / _fastest_seconds(int8, {"a": rng.integers(0, 256, (m, k), dtype=np.uint8)}, budget_s),
    }


def measured_limits(macs: int, peaks: dict, fp32_macs_per_cycle: int | None) -> dict:
    """Fastest latency at the measured kernel rates, and the clock the FP32 rate implies."""
    limits = dict(peaks)
    limits["fp32LimitMs"] = macs / peaks["fp32MacsPerS"] * 1000.0
    limits["int8LimitMs"] = macs / peaks["int8MacsPerS"] * 1000.0
    if fp32_macs_per_cycle:
        limits["impliedClockGHz"] = peaks["fp32MacsPerS"] / peaks["threads"] / fp32_macs_per_cycle / 1e9
    return limits


def layer_efficiency(by_type: dict[str, int], profile: list[dict], peaks: dict) -> list[dict]:
    """Per counted layer type: the op types that ran it, their time, and the MAC rate against the peak
    of their precision (INT8 when any of them is INT8)."""
    rows = []
    for layer, macs in sorted(by_type.items(), key=lambda kv: -kv[1]):
        ops = [row for row in profile if row["op"] in RUNS_AS.get(layer, ())]
        ms = sum(row["ms"] for row in ops)
        if not ops or ms <= 0:
            continue
        int8 = [row["op"] in INT8_OPS for row in ops]
        precision = "int8" if all(int8) else "mixed" if any(int8) else "fp32"
        rate = macs / (ms / 1000.0)
        peak = peaks["int8MacsPerS"] if precision != "fp32" else peaks["fp32MacsPerS"]
        rows.append({"layer": layer, "macs": macs, "ranAs": [row["op"] for row in ops], "precision": precision,
                     "ms": ms, "macsPerS": rate, "fractionOfPeak": rate / peak})
    return rows
