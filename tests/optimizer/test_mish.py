"""Mish for ONNX Runtime: rewritten from Exp/Add/Mul/Div, the same function, left FP32 by the quantizer."""

from __future__ import annotations

import numpy as np
import pytest

from optimizer.engines import mish


def _model(path, legacy: bool) -> None:
    import onnx
    from onnx import TensorProto, helper

    if legacy:  # what the TorchScript exporter writes
        nodes = [helper.make_node("Softplus", ["x"], ["s"], name="sp"), helper.make_node("Tanh", ["s"], ["t"], name="th"),
                 helper.make_node("Mul", ["x", "t"], ["m"], name="mul")]
    else:  # the opset-18 op (the dynamo exporter)
        nodes = [helper.make_node("Mish", ["x"], ["m"], name="mish")]
    nodes.append(helper.make_node("Relu", ["m"], ["y"], name="after"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 50])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 50])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.mark.parametrize("legacy", [True, False])
def test_rewritten_mish_is_mish(tmp_path, legacy):
    import onnx
    import onnxruntime as ort

    _model(tmp_path / "m.onnx", legacy)
    assert mish.rewrite(tmp_path / "m.onnx", tmp_path / "r.onnx", False, "r.onnx.data") == 1
    ops = [n.op_type for n in onnx.load(str(tmp_path / "r.onnx")).graph.node]
    assert "Softplus" not in ops and "Mish" not in ops and "Exp" in ops
    x = np.linspace(-30, 100, 100, dtype=np.float32).reshape(2, 50)
    expected = np.maximum(x * np.tanh(np.log1p(np.exp(x.astype(np.float64)))), 0)
    got = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert len(mish.rewritten_nodes(tmp_path / "r.onnx")) == 7


def test_a_model_without_mish_is_left_alone(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Softplus", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "s.onnx"))
    assert mish.rewrite(tmp_path / "s.onnx", tmp_path / "out.onnx", False, "out.onnx.data") == 0
    assert not (tmp_path / "out.onnx").exists()
