"""How much arithmetic a model does, and what that implies for the fastest possible latency.

Multiply-accumulates are counted with forward hooks on the layers that dominate (Conv, Linear,
LSTM, GRU) at the declared input, as the matrix products they are. Three limits follow from them:
- nominal: MACs / (MACs per cycle from the CPU's flags × the clock in /proc/cpuinfo). Cloud VMs
  report the base clock while the core boosts, so this limit can be slower than what runs;
- peak: MACs / the rate ONNX Runtime's own FP32 and INT8 GEMM kernels reach here on a large
  matrix product at the benchmark's thread count: what every layer would take at the kernels' best;
- at the model's shapes: every product timed with the same kernels at its own shape (a conv as its
  im2col GEMM; an LSTM/GRU as one GEMM over all time steps for its input and one matrix-vector
  product per step for its recurrence, which batch-1 inference cannot merge). A small product never
  reaches the large-GEMM peak, so this is the ceiling a runtime can actually approach; the gap to it
  is the work between the products (quantization, gates, reshapes, pooling).
Per layer type, the op-time profile of the best variant then says how close each gets to both.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optimizer.engines.runners import session_options
from optimizer.measure.hardware import AMX_FLAG, VNNI_DOT_FLAGS

# Per core per cycle, for the common x86 cases (two FMA/dot-product pipes).
FP32_MACS_PER_CYCLE = {"avx512f": 16, "avx2": 16}  # Zen 4 double-pumps AVX-512: same as 2×AVX2 FMA
INT8_MACS_PER_CYCLE = {AMX_FLAG: 1024, **dict.fromkeys(VNNI_DOT_FLAGS, 64), "avx2": 32}  # first match wins

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


@dataclass(frozen=True)
class Product:
    """`count` matrix products of (m × k) by (k × n) that one layer type does per inference."""

    layer: str
    m: int
    k: int
    n: int
    count: int = 1

    @property
    def macs(self) -> int:
        return self.m * self.k * self.n * self.count


def count_products(module, feed: dict, input_names: list[str]) -> list[Product]:
    """The matrix products of one call on `feed`; empty if the module takes no hooks."""
    import torch

    products: list[Product] = []

    def conv(layer, inputs, output):
        groups = layer.groups
        channels = output.shape[output.dim() - len(layer.kernel_size) - 1]
        positions = output.numel() // channels  # batch × output pixels
        kernel = layer.weight[0].numel()  # in_channels/groups × kernel area
        products.append(Product("Conv", positions, kernel, layer.out_channels // groups, groups))

    def linear(layer, inputs, output):
        products.append(Product("Linear", output.numel() // layer.out_features, layer.in_features, layer.out_features))

    def recurrent(layer, inputs, output):
        kind = type(layer).__name__
        gates = {"LSTM": 4, "GRU": 3}[kind]
        sequence = output[0]
        batch, steps = (sequence.shape[0], sequence.shape[1]) if layer.batch_first else (sequence.shape[1], sequence.shape[0])
        directions = 2 if layer.bidirectional else 1
        hidden = layer.hidden_size
        for index in range(layer.num_layers):
            in_size = layer.input_size if index == 0 else hidden * directions
            products.append(Product(kind, steps * batch, in_size, gates * hidden, directions))  # input, all steps at once
            products.append(Product(kind, batch, hidden, gates * hidden, steps * directions))  # recurrence, step by step

    hooks_for = {torch.nn.Conv1d: conv, torch.nn.Conv2d: conv, torch.nn.Linear: linear,
                 torch.nn.LSTM: recurrent, torch.nn.GRU: recurrent}
    if not hasattr(module, "modules") or isinstance(module, torch.jit.ScriptModule):
        return []
    handles = [m.register_forward_hook(hooks_for[type(m)]) for m in module.modules() if type(m) in hooks_for]
    try:
        with torch.inference_mode():
            module(*(torch.from_numpy(feed[name]) for name in input_names))
    finally:
        for handle in handles:
            handle.remove()
    return products


def macs_by_type(products: list[Product]) -> dict[str, int]:
    counts: Counter = Counter()
    for product in products:
        counts[product.layer] += product.macs
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


def _gemm_session(op: str, weights: np.ndarray, input_type: int, output_type: int, threads: int, m: int,
                  copies: int = 1):
    """`copies` independent products in one graph: small ones are timed without a Python call each."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    k = weights.shape[0]
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], [f"y{index}"]) for index in range(copies)], "gemm",
        [helper.make_tensor_value_info("a", input_type, [m, k])],
        [helper.make_tensor_value_info(f"y{index}", output_type, None) for index in range(copies)],
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


def _rates(m: int, k: int, n: int, threads: int, budget_s: float, copies: int = 1) -> tuple[float, float]:
    """MACs per second of ONNX Runtime's FP32 (MatMul) and INT8 (MatMulInteger, u8×s8) CPU kernels
    on an (m × k) by (k × n) product."""
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    fp32 = _gemm_session("MatMul", rng.standard_normal((k, n), dtype=np.float32),
                         TensorProto.FLOAT, TensorProto.FLOAT, threads, m, copies)
    int8 = _gemm_session("MatMulInteger", rng.integers(-128, 128, (k, n), dtype=np.int8),
                         TensorProto.UINT8, TensorProto.INT32, threads, m, copies)
    macs = m * k * n * copies
    return (macs / _fastest_seconds(fp32, {"a": rng.standard_normal((m, k), dtype=np.float32)}, budget_s),
            macs / _fastest_seconds(int8, {"a": rng.integers(0, 256, (m, k), dtype=np.uint8)}, budget_s))


def gemm_peaks(threads: int, budget_s: float = 0.1) -> dict:
    """The kernels' rates on a large product: their peak here."""
    m, k, n = GEMM_SHAPE
    fp32, int8 = _rates(m, k, n, threads, budget_s)
    return {"gemm": f"{m}x{k}x{n}", "threads": threads, "fp32MacsPerS": fp32, "int8MacsPerS": int8}


SMALL_PRODUCT_MACS = 4_000_000  # below this a product is timed as several copies in one graph


def shape_limits(products: list[Product], threads: int, budget_s: float = 1.0) -> dict:
    """Milliseconds per inference if every product ran at the kernels' rate for its own shape.

    Each distinct shape is timed once (`budget_s` shared among them). A small product is timed as
    up to 16 copies in one graph, as a recurrence's steps run inside one op, so a Python call per
    product does not count against the kernel; ONNX Runtime's dispatch of each node (about a
    microsecond) still does, which makes the recurrent share slightly generous.
    """
    shapes: dict[tuple[int, int, int], int] = Counter()
    for product in products:
        shapes[(product.m, product.k, product.n)] += product.count
    per_shape_s = budget_s / max(1, len(shapes)) / 2  # two precisions
    rates = {}
    for (m, k, n), count in shapes.items():
        copies = max(1, min(count, 16, SMALL_PRODUCT_MACS // (m * k * n)))
        rates[(m, k, n)] = _rates(m, k, n, threads, per_shape_s, copies)
    limits: dict = {"threads": threads, "shapes": len(shapes), "byType": {}}
    for precision, index in (("fp32", 0), ("int8", 1)):
        total = 0.0
        for product in products:
            ms = product.macs / rates[(product.m, product.k, product.n)][index] * 1000.0
            by_type = limits["byType"].setdefault(product.layer, {"fp32Ms": 0.0, "int8Ms": 0.0})
            by_type[f"{precision}Ms"] += ms
            total += ms
        limits[f"{precision}LimitMs"] = total
    return limits


def measured_limits(macs: int, peaks: dict, fp32_macs_per_cycle: int | None) -> dict:
    """Fastest latency at the measured kernel rates, and the clock the FP32 rate implies."""
    limits = dict(peaks)
    limits["fp32LimitMs"] = macs / peaks["fp32MacsPerS"] * 1000.0
    limits["int8LimitMs"] = macs / peaks["int8MacsPerS"] * 1000.0
    if fp32_macs_per_cycle:
        limits["impliedClockGHz"] = peaks["fp32MacsPerS"] / peaks["threads"] / fp32_macs_per_cycle / 1e9
    return limits


def layer_efficiency(by_type: dict[str, int], profile: list[dict], peaks: dict, at_shapes: dict | None = None) -> list[dict]:
    """Per counted layer type: the op types that ran it, their time, and the MAC rate against the peak
    of their precision (INT8 when any of them is INT8) and against the kernels at its own shapes."""
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
        row = {"layer": layer, "macs": macs, "ranAs": [row["op"] for row in ops], "precision": precision,
               "ms": ms, "macsPerS": rate, "fractionOfPeak": rate / peak}
        limit = (at_shapes or {}).get("byType", {}).get(layer)
        if limit:
            row["shapeLimitMs"] = limit["fp32Ms" if precision == "fp32" else "int8Ms"]
            row["fractionOfShapeLimit"] = row["shapeLimitMs"] / ms
        rows.append(row)
    return rows
