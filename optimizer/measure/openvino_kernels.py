"""The compute kernels an OpenVINO variant runs, timed inside its own inference, at the model's shapes.

OpenVINO's CPU plugin times every node it executes when the model is compiled with performance
counters on (PERF_COUNT). Its counters keep, per node, only the running mean of every execution
since the model was compiled, in whole microseconds (`profiling_info`'s `real_time`); one
execution's time cannot be read back. So the best variant's own IR, compiled again exactly as its
runner compiles it plus the counters, runs a short burst of back-to-back inferences per round (as
the benchmark runs it) beside the other limits, and each compute node's mean over the rounds is
taken from the counters' totals, rounded down. Those nodes (Convolution, FullyConnected, RNNSeq,
..., with what OpenVINO fused into them) are part of every inference of that variant, so the sum of
their means is below its mean time, as the ONNX Runtime kernels are below an ONNX Runtime
variant's. Nodes OpenVINO folds into a generated `Subgraph` (snippets) are not counted: the line is
looser there, never beaten. The kernels that ran (`exec_type`, e.g. brgconv_avx512_amx_bf16) and
the precision they ran at come from OpenVINO's executed graph.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

from optimizer.measure.fastest import Parts

# OpenVINO CPU plugin node types (its executed graph) that do a layer's products.
COMPUTE_NODES = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul",
                           "RNNSeq", "RNNCell", "ScaledDotProductAttention"})
INT8 = frozenset({"i8", "u8"})
HALF = frozenset({"bf16", "f16"})


BURST_SECONDS = 0.05  # back-to-back inferences per round: about this long, as the benchmark runs them; the
# first of a burst, after the other calls of the round, runs from colder caches
MAX_BURST = 20


@dataclass
class OpenVinoKernels:
    """The best variant's compute nodes as OpenVINO runs them: one burst of profiled inferences per call."""

    variant: str
    run: Callable[[], Parts] = field(repr=False)
    layer_of: dict[str, str]  # node name -> node type, for every compute node
    exec_type: dict[str, str]  # node name -> the kernel that ran it (as the first call found it)
    precision: str  # int8 | bf16 | fp32, from the precisions the compute nodes ran at
    burst: int  # inferences per call
    restart: Callable[[], None] = field(repr=False, default=lambda: None)  # the next call starts the means anew


def precision_of(runtime_precisions) -> str:
    """int8 when any compute node runs on 8-bit integers, bf16 when any runs at 16-bit floats, else fp32."""
    found = set(runtime_precisions)
    return "int8" if found & INT8 else "bf16" if found & HALF else "fp32"


def runtime_precision(compiled) -> str:
    """What a compiled model's compute nodes run at, read from OpenVINO's executed graph (each
    node's `runtimePrecision`), not from the recipe that built it."""
    info = [op.get_rt_info() for op in compiled.get_runtime_model().get_ops()]
    return precision_of(rt["runtimePrecision"].astype(str).lower() for rt in info
                        if "layerType" in rt and "runtimePrecision" in rt and rt["layerType"].astype(str) in COMPUTE_NODES)


def _compute_nodes(compiled) -> dict[str, tuple[str, str]]:
    """node name -> (node type, kernel) for every compute node of OpenVINO's executed graph."""
    nodes = {}
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        if "layerType" in rt and rt["layerType"].astype(str) in COMPUTE_NODES:
            kernel = rt["primitiveType"].astype(str) if "primitiveType" in rt else "unknown"
            nodes[op.get_friendly_name()] = (rt["layerType"].astype(str), kernel)
    return nodes


def openvino_kernels(variant: str, runner, feed: dict, mean_ms: float) -> OpenVinoKernels:
    """`runner` (an OpenVinoRunner) compiled again with performance counters, bound to `feed`; each
    call runs a burst of inferences (about BURST_SECONDS at `mean_ms` each) and returns, per compute
    node, its mean seconds per execution since the first call (that first call is a warm-up)."""
    compiled = runner.compile_profiled()
    request = compiled.create_infer_request()
    inputs = {port.get_any_name(): feed[port.get_any_name()] for port in compiled.inputs}
    nodes = _compute_nodes(compiled)
    exec_type = {name: kernel for name, (_, kernel) in nodes.items()}
    burst = max(1, min(MAX_BURST, int(BURST_SECONDS * 1000.0 / max(mean_ms, 1e-3))))
    state: dict = {"runs": 0, "start": None}

    def run() -> Parts:
        for _ in range(burst):
            request.infer(inputs)
        state["runs"] += burst
        # Each node has run once per inference: its counter's mean × runs is its total, up to runs - 1 µs
        # the integer mean dropped. The mean since the start is taken at its lowest possible value.
        means = {node.node_name: node.real_time // timedelta(microseconds=1) for node in request.profiling_info
                 if node.node_name in nodes}
        if state["start"] is None:
            state["start"] = (state["runs"], means)
            # Some kernels are only picked at the first inference (the executed graph says "undef" before).
            exec_type.update({node.node_name: node.exec_type for node in request.profiling_info if node.node_name in nodes})
            return Parts()
        first_runs, first = state["start"]
        runs = state["runs"]
        return Parts({name: max(0, mean * runs - (first[name] * first_runs + first_runs - 1)) / (runs - first_runs) / 1e6
                      for name, mean in means.items()})

    return OpenVinoKernels(variant, run, {name: layer for name, (layer, _) in nodes.items()}, exec_type,
                           runtime_precision(compiled), burst, lambda: state.update(start=None))


def exec_types(kernels: OpenVinoKernels) -> dict[str, int]:
    """How many compute nodes each kernel ran, most first."""
    return dict(sorted(Counter(kernels.exec_type.values()).items(), key=lambda kv: (-kv[1], kv[0])))
