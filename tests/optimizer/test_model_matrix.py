"""Every model a user brings: four architectures × the four formats users save them in.

Each cell writes the model as a user would (a state_dict beside its class, a TorchScript trace, a
torch.export .pt2, an ONNX file from torch.onnx.export) and runs the whole pipeline on it. A cell
either ends with an FP32 baseline and a best variant, or with a message that says what to change;
which of the two is pinned per cell, so a regression in either direction fails. The table of
outcomes is printed at the end of the run (see conftest.pytest_terminal_summary).
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import write_spec

pytestmark = pytest.mark.slow  # every test here runs the whole pipeline

MATRIX_MODELS = textwrap.dedent(
    '''
    import torch
    import torch.nn as nn


    class ConvBnRelu(nn.Module):
        """An image classifier: conv + BN + ReLU blocks, global pooling, a linear head."""

        def __init__(self, classes: int = 5):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU())
            self.head = nn.Linear(16, classes)

        def forward(self, image):
            return self.head(self.features(image).mean(dim=(2, 3)))


    class GruTagger(nn.Module):
        """A sequence tagger: embedding-like projection, a GRU, a per-step classifier."""

        def __init__(self, classes: int = 4):
            super().__init__()
            self.project = nn.Linear(6, 16)
            self.gru = nn.GRU(16, 24, batch_first=True)
            self.head = nn.Linear(24, classes)

        def forward(self, tokens):
            out, _ = self.gru(torch.relu(self.project(tokens)))
            return self.head(out)


    class Encoder(nn.Module):
        """A transformer encoder (nn.MultiheadAttention inside) with a pooled classifier."""

        def __init__(self, classes: int = 3):
            super().__init__()
            self.embed = nn.Linear(8, 32)
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, classes)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x)).mean(dim=1))


    class TwoHeads(nn.Module):
        """A detector in miniature: one conv trunk, class scores and box offsets as two outputs."""

        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1), nn.ReLU())
            self.scores = nn.Conv2d(12, 4, 1)
            self.boxes = nn.Conv2d(12, 4, 1)

        def forward(self, image):
            features = self.trunk(image)
            return self.scores(features), self.boxes(features)
    '''
)

# name -> (class, the spec's inputs). Axis 0 is the batch everywhere: users serve batches.
ARCHITECTURES = {
    "conv-bn-relu": ("ConvBnRelu", [{"name": "image", "shape": [1, 3, 16, 16], "dynamicAxes": {0: "batch"}}]),
    "gru": ("GruTagger", [{"name": "tokens", "shape": [1, 12, 6], "dynamicAxes": {0: "batch"}}]),
    "transformer": ("Encoder", [{"name": "x", "shape": [1, 10, 8], "dynamicAxes": {0: "batch"}}]),
    "multi-output": ("TwoHeads", [{"name": "image", "shape": [1, 3, 12, 12], "dynamicAxes": {0: "batch"}}]),
}
FORMATS = ["state-dict", "torchscript", "exported-program", "onnx"]

# Cells that end with a message instead of a best variant, and a phrase the message must hold.
EXPECTED_MESSAGES: dict[tuple[str, str], str] = {}
# Cells that run at the declared shape only, and a phrase of the note that says so: a TorchScript trace keeps
# sizes as it saw them, so neither export route keeps a transformer's batch dynamic.
STATIC_CELLS = {("transformer", "torchscript"): "could not be exported with the declared dynamicAxes"}
# The dynamo exporter and the TorchScript converter take tens of seconds on a transformer or GRU.
SLOW_CELLS = {("transformer", "state-dict"), ("transformer", "exported-program"), ("transformer", "torchscript"),
              ("transformer", "onnx"), ("gru", "state-dict"), ("gru", "exported-program"), ("gru", "onnx")}

MATRIX_OUTCOMES: dict[tuple[str, str], str] = {}  # read by conftest's terminal summary

QUICK = {"warmup": 3, "runs": 10, "rounds": 1, "scalingBatches": []}


def _user_module(directory: Path):
    source = directory / "matrix_models.py"
    source.write_text(MATRIX_MODELS)
    spec = importlib.util.spec_from_file_location("matrix_models", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.pop("matrix_models", None)  # the loader under test imports it itself, from the spec's folder
    return module


def _example(inputs: list[dict], batch: int = 1):
    import torch

    return tuple(torch.rand(batch, *spec["shape"][1:]) for spec in inputs)


def save_model(directory: Path, architecture: str, fmt: str) -> dict:
    """Write the model as a user would; return the spec's `model` section for it."""
    import torch

    cls, inputs = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    model = getattr(_user_module(directory), cls)().eval()
    if fmt == "state-dict":
        torch.save(model.state_dict(), directory / "model.pt")
        return {"source": "model.pt", "entrypoint": f"matrix_models:{cls}", "inputs": inputs}
    if fmt == "torchscript":
        # Traced with gradients on, as in training code: under no_grad a transformer records a fused
        # kernel that has no ONNX form (test_torchscript_traced_under_no_grad_says_how_to_fix_it).
        torch.jit.save(torch.jit.trace(model, _example(inputs), check_trace=False), str(directory / "model.ts"))
        return {"source": "model.ts", "format": "torchscript", "inputs": inputs}
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = tuple({0: batch} for _ in inputs)
    if fmt == "exported-program":
        program = torch.export.export(model, _example(inputs, batch=2), dynamic_shapes=dynamic)
        torch.export.save(program, str(directory / "model.pt2"))
        return {"source": "model.pt2", "inputs": inputs}
    torch.onnx.export(model, _example(inputs, batch=2), str(directory / "model.onnx"), dynamo=True,
                      input_names=[spec["name"] for spec in inputs], dynamic_shapes=dynamic, external_data=False)
    return {"source": "model.onnx", "inputs": inputs}


TRANSFORMER_RECIPES = ("ort-transformer-fp32", "ort-transformer-int8-dynamic", "ort-int4-weight-only")


def _cells():
    for architecture in ARCHITECTURES:
        for fmt in FORMATS:
            marks = [pytest.mark.slow] if (architecture, fmt) in SLOW_CELLS else []
            yield pytest.param(architecture, fmt, id=f"{architecture}-{fmt}", marks=marks)


@pytest.mark.parametrize("architecture,fmt", list(_cells()))
def test_model_matrix_cell(tmp_path, architecture, fmt):
    import warnings

    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.api.spec_loader import load_spec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the user's own export, not what is under test
        model = save_model(tmp_path, architecture, fmt)
    spec = write_spec(tmp_path, {"model": model, "data": {"source": "random", "samples": 8}, "benchmark": QUICK,
                                 "acceptance": {"maxAccuracyDrop": 0.5}})
    results = optimize(load_spec(spec), tmp_path / "out", tmp_path, QuietReporter())

    baseline = results.baseline
    assert baseline.status == "ok" and baseline.latencyMs is not None and baseline.sizeBytes > 0
    failed = [v for v in results.variants if v.status == "failed"]
    assert not [v.error for v in failed if "internal error" in v.error], "an mlopt bug surfaced as a reason"
    if fmt == "state-dict":  # the PyTorch recipes run too (the transformer's MHA fast path included)
        assert results.variant("torch-int8-dynamic").status == "ok", results.variant("torch-int8-dynamic").error
    if fmt == "torchscript":  # torch.jit.load's deprecation notice is kept for the report, not printed
        assert any("torch.jit.load" in text for text in results.warnings), results.warnings
    if (architecture, fmt) in STATIC_CELLS:
        assert STATIC_CELLS[architecture, fmt] in " ".join(results.model.get("inputNotes", [])), results.model
        assert not any(spec["dynamicAxes"] for spec in results.model["inputs"])
    expected = EXPECTED_MESSAGES.get((architecture, fmt))
    if expected is None:
        # Without a GRU, ort-int8-static-dynamic is ort-int8-static's model: skipped, not built twice.
        duplicate = results.variant("ort-int8-static-dynamic")
        if architecture != "gru":
            assert duplicate.status == "skipped" and "same model as ort-int8-static" in duplicate.error, duplicate
        # The transformer recipes skip, saying why, where there is nothing for them: no attention to fuse,
        # weights mostly outside MatMul/embeddings. The transformer's own cell must build them.
        skipped = [v for v in results.variants if v.recipe in TRANSFORMER_RECIPES and v.status == "skipped"]
        assert all(any(why in v.error for why in ("not a transformer", "not MatMul-heavy", "fused nothing"))
                   for v in skipped), [(v.name, v.error) for v in skipped]
        if architecture == "transformer":
            assert not [v for v in skipped if v.recipe != "ort-int4-weight-only"], [(v.name, v.error) for v in skipped]
        onnx = [v for v in results.variants if v.recipe.startswith(("onnx-fp32", "ort-"))
                and not (architecture != "gru" and v is duplicate) and v not in skipped]
        assert onnx and all(v.status == "ok" and v.latencyMs for v in onnx), [(v.name, v.error) for v in onnx]
        if results.best is None:
            # Honest only for an ONNX source: it is its own FP32 baseline, and on a tiny model nothing
            # may beat it on a busy machine (the reason must say exactly that). A PyTorch baseline is
            # always beaten by its verified ONNX export in ONNX Runtime on these models: no best there
            # is a regression (the test used to accept it for every format).
            assert fmt == "onnx", f"no best variant for a {fmt} model: {results.bestReason}"
            assert results.bestReason.startswith("no variant within the accuracy budget is faster"), results.bestReason
            fastest = max(onnx, key=lambda v: v.speedup)
            MATRIX_OUTCOMES[(architecture, fmt)] = f"none faster ({fastest.name} {fastest.speedup:.2f}x)"
        else:
            best = results.variant(results.best)
            assert best.status == "ok" and best.speedup > 1, (best.name, best.status, best.speedup)
            assert best.latencyMs is not None and best.artifact and (tmp_path / "out" / best.artifact).exists()
            MATRIX_OUTCOMES[(architecture, fmt)] = f"{results.best} {best.speedup:.2f}x"
    else:
        message = results.model.get("exportError", "")
        assert expected in message, message
        MATRIX_OUTCOMES[(architecture, fmt)] = f"message: …{expected}…"
