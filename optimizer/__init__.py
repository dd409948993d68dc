"""mlopt's optimizer: export PyTorch models to ONNX, build INT8 variants, measure and pick one.

Import-light on purpose: `optimizer.api.spec` is used by the operator, which never imports torch.
"""

__version__ = "0.1.0"
