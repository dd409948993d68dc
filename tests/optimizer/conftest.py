"""Small real models written as user code, and one pipeline run shared by many tests.

The models live in a file written to tmp, exactly as a user's `model.py` beside their spec.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

USER_MODELS = textwrap.dedent(
    '''
    import torch
    import torch.nn as nn


    class ConvLstm(nn.Module):
        """A CRNN in miniature: conv+bn+relu, pooling, a linear map, a bidirectional LSTM."""

        def __init__(self, classes: int = 6):
            super().__init__()
            self.conv = nn.Conv2d(1, 16, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(16)
            self.relu2 = nn.ReLU()
            self.map = nn.Linear(16 * 4, 32)
            self.rnn = nn.LSTM(32, 32, bidirectional=True)
            self.dense = nn.Linear(64, classes)

        def forward(self, x):
            x = self.relu2(self.bn2(self.conv2(self.pool(self.relu(self.bn(self.conv(x)))))))
            b, c, h, w = x.shape
            seq = x.reshape(b, c * h, w).permute(2, 0, 1)
            out, _ = self.rnn(self.map(seq))
            return self.dense(out)


    class DataBranch(nn.Module):
        """Branches in Python on a tensor value: torch.export refuses that, the legacy tracer
        records the branch taken (always the same one here), so only the fallback exports it."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > -1e9:
                return self.linear(x)
            return -self.linear(x)


    class ShapeBaker(nn.Module):
        """Branches in Python on its row count: exporters record only the branch taken at export,
        so the ONNX model is right at the export shape and wrong at a larger one."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[1] > 3:
                return self.linear(x) * 2.0
            return self.linear(x)


    class Outlier(nn.Module):
        """One activation is ruined by 8-bit quantization: fc2's channel 0 is a constant 10^4 that
        fc3 ignores, so uint8 steps of ~40 round every channel fc3 reads to zero. Quantizing the
        rest is harmless; keeping fc3 (and fc2, which quantizes its own output) in FP32 fixes it."""

        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(16, 32)
            self.fc2 = nn.Linear(32, 32)
            self.fc3 = nn.Linear(32, 10)
            with torch.no_grad():
                self.fc2.weight[0].zero_()
                self.fc2.bias[0] = 1e4
                self.fc3.weight[:, 0] = 0.0
                self.fc3.weight *= 10.0
                self.fc3.bias.zero_()

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
    '''
)


def save_user_model(directory: Path, cls: str, **kwargs) -> Path:
    import importlib.util
    import sys

    import torch

    source = directory / "user_models.py"
    source.write_text(USER_MODELS)
    spec = importlib.util.spec_from_file_location("user_models", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.pop("user_models", None)  # the loader under test must import it itself
    torch.manual_seed(0)
    model = getattr(module, cls)(**kwargs)
    if hasattr(model, "bn"):  # give BatchNorm real statistics so it is not an identity
        model.train()
        with torch.no_grad():
            for _ in range(4):
                model(torch.rand(4, 1, 8, 16))
    weights = directory / f"{cls.lower()}.pt"
    torch.save(model.eval().state_dict(), weights)
    return weights


def load_user_model(directory: Path, cls: str, module_name: str):
    """save_user_model's model, built from the user file and its saved weights (its class lives only there)."""
    import importlib.util

    import torch

    weights = save_user_model(directory, cls)
    spec = importlib.util.spec_from_file_location(module_name, directory / "user_models.py")
    source = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(source)
    model = getattr(source, cls)()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def write_spec(directory: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = directory / name
    document = {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "test"}, "spec": spec}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


OUTLIER_INPUTS = [{"name": "x", "shape": [1, 16], "dynamicAxes": {0: "batch"}}]
QUICK_BENCHMARK = {"warmup": 1, "runs": 5, "scalingBatches": []}

ALL_RECIPES = ["onnx-fp32", "ort-int8-dynamic", "ort-int8-static", "ort-int8-static-dynamic", "torch-int8-dynamic",
               "torch-int8-static", "torch-int8-static-dynamic", "onnx-fp16", "ort-transformer-fp32",
               "ort-transformer-int8-dynamic", "ort-int4-weight-only"]
CONV_LSTM_INPUTS = [{"name": "image", "shape": [1, 1, 8, 16], "dynamicAxes": {0: "batch", 3: "width"}}]


@pytest.fixture(scope="session")
def conv_lstm_run(tmp_path_factory):
    """One full pipeline run over every recipe on the miniature CRNN (user state_dict + entrypoint)."""
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.api.spec_loader import load_spec

    directory = tmp_path_factory.mktemp("conv_lstm")
    weights = save_user_model(directory, "ConvLstm")
    spec_path = write_spec(directory, {
        "model": {"source": weights.name, "entrypoint": "user_models:ConvLstm", "inputs": CONV_LSTM_INPUTS},
        "variants": [*({"name": r, "recipe": r} for r in ALL_RECIPES),
                     {"name": "ort-int8-static-entropy", "recipe": "ort-int8-static", "calibration": "entropy"}],
        "data": {"source": "random", "samples": 16},
        "benchmark": {"warmup": 2, "runs": 10},
        "acceptance": {"maxAccuracyDrop": 0.2},
    })
    output = directory / "out"
    results = optimize(load_spec(spec_path), output, directory, QuietReporter())
    return results, output


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """One run on the zoo's digits CNN (real labels): calibration comparison, torch static and QAT."""
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.api.spec_loader import load_spec

    directory = tmp_path_factory.mktemp("digits")
    spec_path = write_spec(directory, {
        "model": {"source": "zoo:digits"},
        "variants": [{"name": "int8", "recipe": "ort-int8-static", "compareCalibration": True},
                     {"name": "torch-int8-static", "recipe": "torch-int8-static"},
                     {"name": "qat", "recipe": "torch-int8-qat", "qatSteps": 20, "qatLearningRate": 1e-4}],
        "data": {"source": "zoo:digits", "samples": 64},
        "benchmark": QUICK_BENCHMARK,
        "acceptance": {"maxAccuracyDrop": 0.05},
    })
    output = directory / "out"
    results = optimize(load_spec(spec_path), output, directory, QuietReporter())
    return results, output


# Session/module fixtures that run the whole pipeline (optimize(...) on a real model); every test that
# uses one is marked `slow` here, so a new test on them lands in the right tier without remembering to.
PIPELINE_FIXTURES = {"conv_lstm_run", "digits_run", "fallback_run", "pt2e_run"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter):
    """The model matrix as a table (architecture × format → best and speedup, or the message)."""
    from .test_model_matrix import ARCHITECTURES, FORMATS, MATRIX_OUTCOMES

    if not MATRIX_OUTCOMES:
        return
    terminalreporter.section("model matrix: best variant and speedup over the FP32 baseline (PyTorch; for ONNX the source file), or the message")
    terminalreporter.write_line("| architecture | " + " | ".join(FORMATS) + " |")
    terminalreporter.write_line("|---|" + "---|" * len(FORMATS))
    for architecture in ARCHITECTURES:
        cells = [MATRIX_OUTCOMES.get((architecture, fmt), "not run") for fmt in FORMATS]
        terminalreporter.write_line(f"| {architecture} | " + " | ".join(cells) + " |")
