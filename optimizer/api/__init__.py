"""The torch-free contract: the spec (and the CRD drawn from it), its loader, results.json, the
status summary, the errors. The operator imports only this package; nothing here may import torch,
onnx, onnxruntime or openvino (tests/test_layout.py checks both rules)."""
