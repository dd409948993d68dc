"""The compute kernels an ONNX Runtime variant runs, each on its own, at the model's shapes.

From the graph ONNX Runtime optimized for a variant (the file it wrote when the variant was
loaded), every node that does a layer's products (QLinearConv, QGemm, DynamicQuantizeLSTM, an
NCHWc Conv, a Gemm ...) is copied, per layer type, into a graph of its own: the same op, the same
attributes, its weights as constant initializers (so ONNX Runtime prepacks them exactly as in the
variant), fed the tensors it received in a real run of the variant. Nothing runs between them:
no (de)quantization of activations, no reshapes, no pooling. The variant runs these same kernels
and more, so their time is a lower bound on the variant's (up to noise), and its gap to the
variant is the work between the products.

A large GEMM with constant weights gives the kernels' peak rate (FP32 MatMul; INT8 QLinearMatMul,
uint8 activations × int8 weights, the pair the static variants run).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from optimizer.engines.runners import session_options

# The ONNX Runtime op types (after its graph optimizations) that do each counted layer type's products.
RUNS_AS = {
    "Conv": {"Conv", "FusedConv", "NhwcFusedConv", "QLinearConv", "ConvInteger"},
    "LSTM": {"LSTM", "DynamicQuantizeLSTM"},
    "GRU": {"GRU"},
    "Linear": {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "QLinearMatMul", "QGemm", "MatMulInteger",
               "DynamicQuantizeMatMul", "MatMulIntegerToFloat"},
}
LAYER_OF_OP = {op: layer for layer, ops in RUNS_AS.items() for op in ops}
INT8_OPS = {"QLinearConv", "ConvInteger", "DynamicQuantizeLSTM", "QLinearMatMul", "QGemm", "MatMulInteger",
            "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
GEMM_SHAPE = (128, 1024, 512)  # M, K, N: conv-sized; about 1.6 ms FP32 and 0.8 ms INT8 on one Zen 3 core


@dataclass
class KernelGraph:
    """One variant's nodes of one layer type, alone in a graph, ready to run."""

    variant: str
    layer: str
    ops: list[str]  # op type of each node, in graph order
    run: Callable[[], object] = field(repr=False)
    constants: frozenset = frozenset()  # the initializers it holds (weights, scales: prepacked by ORT)
    fed: frozenset = frozenset()  # its graph inputs, fed the tensors captured from the variant
    node_inputs: tuple = ()  # per node, the names it reads


def _session(model, threads: int):
    """A session for `model` as the variants' sessions are made."""
    import onnxruntime as ort

    options = session_options(threads)
    # The graph is already optimized; optimizing again could merge identical nodes. Prepacking of
    # constant weights does not depend on this level.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _node_inputs(model, feed: dict) -> dict[str, np.ndarray]:
    """Every tensor a compute node reads that is not a constant, from one run of the optimized graph."""
    from onnx import helper

    graph = model.graph
    constants = {init.name for init in graph.initializer}
    produced = {name for node in graph.node for name in node.output}
    wanted = {name for node in graph.node if node.op_type in LAYER_OF_OP
              for name in node.input if name and name not in constants and name in produced}
    probe = type(model)()
    probe.CopyFrom(model)
    outputs = {output.name for output in probe.graph.output}
    for name in sorted(wanted - outputs):
        probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = _session(probe, 1)
    inputs = {i.name: feed[i.name] for i in session.get_inputs()}
    values = dict(zip((o.name for o in session.get_outputs()), session.run(None, inputs)))
    return {**inputs, **values}


def _layer_model(model, nodes: list, values: dict[str, np.ndarray]):
    """The nodes alone: constants kept as initializers, every other input a graph input of its own
    (so no node feeds another), outputs renamed."""
    from onnx import helper

    constants = {init.name: init for init in model.graph.initializer}
    used, inputs, feed, outputs, copies = {}, [], {}, [], []
    for index, node in enumerate(nodes):
        copy = type(node)()
        copy.CopyFrom(node)
        copy.name = f"kernel{index}"
        del copy.input[:]
        del copy.output[:]
        for name in node.input:
            if not name or name in constants:
                if name:
                    used[name] = constants[name]
                copy.input.append(name)
                continue
            fed = f"in{index}_{len(feed)}"
            value = values[name]
            feed[fed] = value
            inputs.append(helper.make_tensor_value_info(fed, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
            copy.input.append(fed)
        for position, name in enumerate(node.output):
            renamed = f"out{index}_{position}" if name else ""
            copy.output.append(renamed)
            if renamed:
                outputs.append(helper.make_empty_tensor_value_info(renamed))
        copies.append(copy)
    graph = helper.make_graph(copies, "kernels", inputs, outputs, list(used.values()))
    alone = helper.make_model(graph, opset_imports=list(model.opset_import))
    alone.ir_version = model.ir_version
    return alone, feed


def kernel_graphs(variant: str, optimized: Path, feed: dict, threads: int) -> list[KernelGraph]:
    """Per layer type, the variant's compute nodes alone (empty if it has none)."""
    import onnx

    model = onnx.load(str(optimized))
    by_layer: dict[str, list] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type in LAYER_OF_OP:
            by_layer[LAYER_OF_OP[node.op_type]].append(node)
    if not by_layer:
        return []
    values = _node_inputs(model, feed)
    graphs = []
    for layer, nodes in by_layer.items():
        alone, inputs = _layer_model(model, nodes, values)
        session = _session(alone, threads)
        graphs.append(KernelGraph(variant, layer, [node.op_type for node in nodes],
                                  lambda session=session, inputs=inputs: session.run(None, inputs),
                                  frozenset(init.name for init in alone.graph.initializer),
                                  frozenset(i.name for i in alone.graph.input),
                                  tuple(tuple(node.input) for node in alone.graph.node)))
    return graphs


def precision_of(ops) -> str:
    """int8 when any compute kernel is an integer one, else fp32."""
    return "int8" if any(op in INT8_OPS for op in ops) else "fp32"


def peak_gemms(threads: int) -> dict[str, Callable[[], object]]:
    """One large product per precision with constant (prepacked) weights: FP32 MatMul, INT8
    QLinearMatMul (uint8 × int8)."""
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = GEMM_SHAPE
    rng = np.random.default_rng(0)
    scalar = lambda value, dtype, name: numpy_helper.from_array(np.array(value, dtype), name)  # noqa: E731
    cases = {
        "fp32": ([helper.make_node("MatMul", ["a", "b"], ["y"])],
                 [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "b")],
                 rng.standard_normal((m, k), dtype=np.float32)),
        "int8": ([helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"])],
                 [numpy_helper.from_array(rng.integers(-64, 64, (k, n), dtype=np.int8), "b"),
                  scalar(0.01, np.float32, "sa"), scalar(128, np.uint8, "za"), scalar(0.01, np.float32, "sb"),
                  scalar(0, np.int8, "zb"), scalar(0.5, np.float32, "sy"), scalar(128, np.uint8, "zy")],
                 rng.integers(0, 256, (m, k), dtype=np.uint8)),
    }
    calls = {}
    for precision, (nodes, constants, activations) in cases.items():
        graph = helper.make_graph(
            nodes, f"gemm-{precision}",
            [helper.make_tensor_value_info("a", helper.np_dtype_to_tensor_dtype(activations.dtype), [m, k])],
            [helper.make_empty_tensor_value_info("y")], constants)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        session = _session(model, threads)
        calls[precision] = lambda session=session, a=activations: session.run(None, {"a": a})
    return calls


def gemm_macs() -> int:
    m, k, n = GEMM_SHAPE
    return m * k * n


def empty_run(threads: int) -> Callable[[], object]:
    """One session.run of a graph that does nothing (Identity on one float): ONNX Runtime's and
    Python's cost per run, which the kernel graphs' times are measured net of."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["y"])], "empty",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session, one = _session(model, threads), {"a": np.zeros(1, np.float32)}
    return lambda: session.run(None, one)
