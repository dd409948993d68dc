"""Mish for ONNX Runtime: the same function from kernels it runs fast.

ONNX Runtime inlines the opset-18 `Mish` op (and the legacy exporter writes it) as
Mul(x, Tanh(Softplus(x))), and its CPU Softplus kernel is scalar: on zoo:yolov4 at 160×160 Softplus
alone was 38% of the FP32 inference (avx2 fma f16c, 1 thread), and 7.2 ms against PyTorch's fused
mish at 4.2 ms on a 64×80×80 tensor. The identity

    tanh(softplus(x)) = ((1 + eˣ)² − 1) / ((1 + eˣ)² + 1) = n / (n + 2),  n = eˣ(eˣ + 2)

gives Mish from Exp, Add, Mul and Div, which MLAS vectorizes: 1.1 ms on the same tensor, within
2e-6 of the original. eˣ is taken of min(x, 20): past 20, n/(n + 2) is 1 in float32 and eˣ² would
overflow to inf/inf.

The new nodes are named `mlopt_mish/…`: the static quantizer is told to leave them in FP32 (as it
leaves Softplus and Tanh), so they add no Quantize/DequantizeLinear pairs of their own.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "mlopt_mish/"
_CLAMP, _TWO = "mlopt_mish_clamp", "mlopt_mish_two"
CLAMP = 20.0


def _expanded(x: str, y: str, index: int) -> list:
    from onnx import helper

    name = f"{PREFIX}{index}/"
    return [
        helper.make_node("Min", [x, _CLAMP], [name + "clamped"], name=name + "min"),
        helper.make_node("Exp", [name + "clamped"], [name + "exp"], name=name + "exp"),
        helper.make_node("Add", [name + "exp", _TWO], [name + "exp_plus_2"], name=name + "add"),
        helper.make_node("Mul", [name + "exp", name + "exp_plus_2"], [name + "n"], name=name + "n"),
        helper.make_node("Add", [name + "n", _TWO], [name + "n_plus_2"], name=name + "add2"),
        helper.make_node("Div", [name + "n", name + "n_plus_2"], [name + "tanh_softplus"], name=name + "div"),
        helper.make_node("Mul", [x, name + "tanh_softplus"], [y], name=name + "mul"),
    ]


def _softplus_chains(graph) -> dict[str, tuple]:
    """Softplus → Tanh → Mul(x, ·) chains whose intermediates feed nothing else: {softplus node name: (softplus, tanh, mul)}."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}
    chains = {}
    for node in graph.node:
        if node.op_type != "Softplus" or node.domain not in ("", "ai.onnx"):
            continue
        after = consumers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "Tanh" or node.output[0] in outputs:
            continue
        tanh = after[0]
        then = consumers.get(tanh.output[0], [])
        if len(then) != 1 or then[0].op_type != "Mul" or tanh.output[0] in outputs:
            continue
        mul = then[0]
        if sorted(mul.input) == sorted([node.input[0], tanh.output[0]]):
            chains[node.name or node.output[0]] = (node, tanh, mul)
    return chains


def rewrite(source: Path, target: Path, external_data: bool, data_location: str) -> int:
    """Write `source` with every Mish (op or Softplus/Tanh/Mul chain) in the Exp form to `target`;
    returns how many were rewritten (0: nothing written)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    chains = _softplus_chains(graph)
    chained = {id(node) for chain in chains.values() for node in chain}
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type == "Mish" and node.domain in ("", "ai.onnx"):
            nodes += _expanded(node.input[0], node.output[0], count)
            count += 1
        elif node.op_type == "Softplus" and (node.name or node.output[0]) in chains:
            softplus, _, mul = chains[node.name or node.output[0]]
            nodes += _expanded(softplus.input[0], mul.output[0], count)
            count += 1
        elif id(node) not in chained:
            nodes.append(node)
    if not count:
        return 0
    del graph.node[:]
    graph.node.extend(nodes)  # each expansion sits where its first node was: the order stays topological
    graph.initializer.extend([numpy_helper.from_array(np.array(CLAMP, np.float32), _CLAMP),
                              numpy_helper.from_array(np.array(2.0, np.float32), _TWO)])
    onnx.save(model, str(target), save_as_external_data=external_data, all_tensors_to_one_file=True,
              location=data_location)
    return count


def rewritten_nodes(path: Path) -> list[str]:
    """The nodes `rewrite` added to a model: the static quantizer keeps them in FP32."""
    import onnx

    return [node.name for node in onnx.load(str(path), load_external_data=False).graph.node
            if node.name.startswith(PREFIX)]
