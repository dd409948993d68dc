"""The graph rewrite 4-bit weight-only needs: Gemm layers as MatMul + Add, the same function."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from optimizer.engines.ort_transformers import gemm_as_matmul, weight_shares


def _model(rng) -> onnx.ModelProto:
    """x[2, 8] -> Gemm(W1ᵀ, b1) -> Gemm(W2, no bias) -> Gemm(W3ᵀ, b3, alpha=0.5): the last cannot be a plain MatMul."""
    w1, b1 = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((16, 12)).astype(np.float32)
    w3, b3 = rng.standard_normal((4, 12)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
             helper.make_node("Gemm", ["h1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Gemm", ["h2", "w3", "b3"], ["y"], name="fc3", transB=1, alpha=0.5)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"),
                                                                          (w3, "w3"), (b3, "b3"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_gemms_with_constant_weights_become_matmul_plus_add_and_compute_the_same():
    rng = np.random.default_rng(0)
    model, x = _model(rng), rng.standard_normal((2, 8)).astype(np.float32)
    before = _run(model, x)

    assert gemm_as_matmul(model.graph) == 2  # fc3 scales by alpha: left a Gemm
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "MatMul", "Gemm"]
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-5, atol=1e-5)
    initializers = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert initializers["w1/mlopt_transposed"] == (8, 16) and "w1" not in initializers  # the transposed copy replaces it
    assert initializers["w3"] == (4, 12)  # still read by the Gemm that stayed


def test_weight_shares_count_only_the_weights_the_quantizer_packs():
    model = _model(np.random.default_rng(0))
    share, by_op = weight_shares(model.graph)
    assert by_op["Gemm"] == 16 * 8 + 16 * 12 + 4 * 12 and by_op["other"] == 16 + 4  # biases are not packed
    assert share == by_op["Gemm"] / (by_op["Gemm"] + 20)
