"""Quieting a library's log never changes the root logger (or any other logger) for the rest of the run."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimizer.engines import ort


def _matmul_model(path) -> None:
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_the_quantizers_quiet_mode_leaves_the_root_logger_as_it_was(tmp_path):
    root = logging.getLogger()
    level, filters, handlers = root.level, list(root.filters), list(root.handlers)
    source, target = tmp_path / "model.onnx", tmp_path / "int8.onnx"
    _matmul_model(source)
    ctx = SimpleNamespace(external_data=False, hardware=SimpleNamespace(reduce_range=False))
    ort._dynamic(ctx, source, target, ["MatMul"])
    assert target.is_file()
    assert (root.level, root.filters, root.handlers) == (level, filters, handlers)


def test_only_the_quantizers_own_records_are_dropped_and_only_inside_the_call():
    root, seen = logging.getLogger(), _Records()
    level = root.level
    root.addHandler(seen)
    root.setLevel(logging.DEBUG)
    try:
        import onnxruntime.quantization.quant_utils as quant_utils

        quantizer_file = quant_utils.__file__
        with ort._quiet():
            root.handle(root.makeRecord("root", logging.INFO, quantizer_file, 1, "from the quantizer", (), None))
            root.handle(root.makeRecord("root", logging.ERROR, quantizer_file, 1, "quantizer error", (), None))
            logging.info("from mlopt")
        root.handle(root.makeRecord("root", logging.INFO, quantizer_file, 1, "after the call", (), None))
    finally:
        root.removeHandler(seen)
        root.setLevel(level)
    assert [r.getMessage() for r in seen.records] == ["quantizer error", "from mlopt", "after the call"]
    assert root.level == level
