"""Which nodes' quantization hurts most: the accuracy fallback keeps those in FP32.

As ONNX Runtime's `qdq_loss_debug` does, both models are augmented so that every float
activation becomes a graph output, run on a few calibration inputs, and each activation of the
quantized model is compared with its FP32 counterpart (SQNR). A node is then blamed for the noise
it adds: the noise-to-signal ratio of its output minus that of its inputs, as the FP32 model
computed them. Differences of linear noise ratios (not of dB) let a node fed by the exact graph
input compare fairly with one deep in the graph. Tensor-wide SQNR alone would miss the classic
failure, an activation whose outlier channel stretches the 8-bit range so far that every other
channel rounds to zero: the tensor still looks fine, the next node's output does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SQNR_CAP_DB = 200.0  # identical tensors: report a finite number


@dataclass(frozen=True)
class NodeSensitivity:
    node: str
    op_type: str
    input_sqnr_db: float  # worst input, before the node's own input quantization
    output_sqnr_db: float  # worst output
    added_noise: float  # output noise-to-signal ratio minus the inputs' (linear)
    feeders: tuple[str, ...] = ()  # nodes whose output quantization feeds this node

    def record(self) -> dict:
        return {"node": self.node, "opType": self.op_type, "inputSqnrDb": round(self.input_sqnr_db, 2),
                "outputSqnrDb": round(self.output_sqnr_db, 2), "addedNoise": float(f"{self.added_noise:.4g}"),
                "feeders": list(self.feeders)}


def sqnr_db(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio over all items, in dB (ORT's definition)."""
    left = np.concatenate([r.reshape(-1) for r in reference]).astype(np.float64)
    right = np.concatenate([c.reshape(-1) for c in candidate]).astype(np.float64)
    signal, noise = np.linalg.norm(left), np.linalg.norm(left - right)
    if noise == 0.0:
        return SQNR_CAP_DB
    if signal == 0.0:
        return -SQNR_CAP_DB
    return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 20 * math.log10(signal / noise)))


def _noise_ratio(db: float) -> float:
    return 10 ** (-db / 10)


def _activations(model: Path, augmented: Path, items: list[dict]) -> dict[str, list[np.ndarray]]:
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    modify_model_output_intermediate_tensors(str(model), str(augmented))
    return collect_activations(str(augmented), iter(items))


@dataclass
class _QuantizedGraph:
    """The quantized model's structure, as far as blaming its nodes needs it."""

    nodes: list  # onnx NodeProto, the compute nodes that run quantized
    seen: dict[str, str]  # tensor a node reads or writes -> the tensor holding its value after Q/DQ
    original: dict[str, str]  # tensor -> the name it had before the quantizer inserted Q/DQ
    producer: dict[str, object]  # tensor -> the node that writes it

    @classmethod
    def load(cls, path: Path) -> "_QuantizedGraph":
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        initializers = {tensor.name for tensor in graph.initializer}
        by_input: dict[str, list] = {}
        producer = {}
        for node in graph.node:
            for name in node.input:
                by_input.setdefault(name, []).append(node)
            for name in node.output:
                producer[name] = node
        seen, original = {}, {}
        for node in graph.node:  # T -> QuantizeLinear -> DequantizeLinear -> T_dq: consumers see T_dq
            if node.op_type != "QuantizeLinear" or node.input[0] in initializers:
                continue
            for dq in by_input.get(node.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    seen[node.input[0]] = dq.output[0]
                    original[dq.output[0]] = node.input[0]
        dequantized = set(original)
        weights = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers}
        nodes = [n for n in graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                 and (any(i in dequantized or i in weights for i in n.input) or n.op_type.startswith("DynamicQuantize"))]
        return cls(nodes, seen, original, producer)


def _float_name(name: str, float_tensors: set[str], graph: _QuantizedGraph) -> str | None:
    """The FP32 model's name for a tensor of the quantized model (the quantizer renames some)."""
    for candidate in (name, graph.original.get(name, ""), name.removesuffix("_QuantizeLinear_Input"),
                      name.removesuffix("_DequantizeLinear_Output")):
        if candidate in float_tensors:
            return candidate
    return None


def rank_nodes(float_model: Path, quantized_model: Path, items: list[dict], workdir: Path) -> list[NodeSensitivity]:
    """The quantized nodes of `float_model`, most harmful first. Node names are those that
    quantize_static's `nodes_to_exclude` takes (the quantizer keeps the float model's names)."""
    import onnx

    workdir.mkdir(parents=True, exist_ok=True)
    reference = _activations(float_model, workdir / "float.augmented.onnx", items)
    quantized = _activations(quantized_model, workdir / "quantized.augmented.onnx", items)
    graph = _QuantizedGraph.load(quantized_model)
    float_graph = onnx.load(str(float_model), load_external_data=False).graph
    float_nodes = {node.name: node for node in float_graph.node}
    graph_inputs = {value.name for value in float_graph.input}
    float_tensors = set(reference) | graph_inputs

    def seen_db(tensor: str) -> float | None:
        value = graph.seen.get(tensor, tensor)  # what the next node reads
        if value not in quantized and tensor in quantized:
            value = tensor
        name = _float_name(value, float_tensors, graph) or _float_name(tensor, float_tensors, graph)
        if name is None or value not in quantized:
            return SQNR_CAP_DB if name in graph_inputs else None
        return sqnr_db(reference[name], quantized[value])

    ranking = []
    for node in graph.nodes:
        name = node.name if node.name in float_nodes else node.name.removesuffix("_quant")
        if name not in float_nodes:
            continue
        outputs = [db for db in map(seen_db, node.output) if db is not None]
        inputs = [db for db in map(seen_db, (graph.original.get(i, i) for i in node.input)) if db is not None]
        if not outputs:
            continue
        worst_in, worst_out = min(inputs or [SQNR_CAP_DB]), min(outputs)
        ranking.append(NodeSensitivity(name, float_nodes[name].op_type, worst_in, worst_out,
                                       _noise_ratio(worst_out) - _noise_ratio(worst_in),
                                       _feeders(node, graph, float_nodes)))
    return sorted(ranking, key=lambda s: -s.added_noise)


def _feeders(node, graph: _QuantizedGraph, float_nodes: dict) -> tuple[str, ...]:
    """Nodes that quantize this node's inputs as their own output (ORT's QDQ Conv, Gemm, ...):
    they must stay FP32 too, or the node still reads 8-bit values."""
    names = []
    for tensor in node.input:
        source = graph.producer.get(graph.original.get(tensor, ""))
        if source is not None and source.op_type not in ("QuantizeLinear", "DequantizeLinear") \
                and source.name in float_nodes:
            names.append(source.name)
    return tuple(names)


def exclusion(ranking: list[NodeSensitivity], count: int) -> list[str]:
    """The nodes to keep in FP32 for the `count` worst-ranked nodes: each with its feeders."""
    excluded: list[str] = []
    for sensitivity in ranking[:count]:
        for name in (sensitivity.node, *sensitivity.feeders):
            if name not in excluded:
                excluded.append(name)
    return excluded


def exclusion_sizes(candidates: int) -> list[int]:
    """How many of the ranked nodes each try keeps in FP32: 1, 2, 4, 8 … and finally all of them."""
    sizes, size = [], 1
    while size < candidates:
        sizes.append(size)
        size *= 2
    return sizes + [candidates] if candidates else []
