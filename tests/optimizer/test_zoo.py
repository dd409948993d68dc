"""The model zoo: every model builds, runs, is deterministic, and quantizes/exports as promised."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from optimizer.steps.data import load_dataset
from optimizer.zoo.digits_data import digits_split
from optimizer.zoo import ZOO, get_zoo_model

# From each model's definition: CRNN (time, batch, classes) with 24 steps for width 100,
# the detector's stride-16 grid with 3 anchors × (5 + 20 classes), class logits otherwise.
# YOLOv4 decodes inside: its first output is boxes, 3 anchors per cell of the 40², 20² and 10² grids.
DECLARED_OUTPUT = {"crnn": (24, 1, 42), "crnn-ocr": (24, 1, 42), "detector": (1, 75, 8, 8), "textlstm": (1, 4), "digits": (1, 10),
                   "yolov4": (1, 3 * (40 * 40 + 20 * 20 + 10 * 10), 4), "shapes-detector": (1, 3 * 8 * 8, 4)}
# Models whose FX static INT8 conversion takes minutes (64 M parameters): tests/optimizer/test_yolov4.py covers them.
LARGE = {"yolov4"}


def first_output(output):
    """A model's first output tensor (a detector returns boxes and scores)."""
    return output[0] if isinstance(output, tuple) else output


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    """A private MLOPT_CACHE for the module: tests never read or write the user's cache.
    crnn-ocr trains for 2 steps only (its real training takes many minutes)."""
    cache = tmp_path_factory.mktemp("mlopt-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLOPT_CACHE", str(cache))
        patch.setenv("MLOPT_CRNN_OCR_STEPS", "2")
        patch.setenv("MLOPT_SHAPES_DETECTOR_STEPS", "2")
        yield cache


@pytest.fixture(scope="module")
def built(zoo_cache) -> dict[str, torch.nn.Module]:
    """Each zoo model built once (the digits model is trained into zoo_cache here)."""
    return {name: entry.build() for name, entry in ZOO.items()}


def example(name: str, batch: int | None = None, **sizes: int) -> torch.Tensor:
    spec = ZOO[name].inputs[0]
    shape = list(spec.shape)
    if batch is not None:
        shape[0] = batch
    for axis, size in sizes.items():
        shape[int(axis.removeprefix("axis"))] = size
    generator = torch.Generator().manual_seed(0)
    if spec.dtype == "int64":
        low, high = spec.valueRange
        return torch.randint(int(low), int(high) + 1, shape, generator=generator)
    return torch.rand(shape, generator=generator)


def test_listing_the_zoo_does_not_import_torch():
    code = "import sys, optimizer.zoo; assert 'torch' not in sys.modules, 'optimizer.zoo imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_every_entry_is_consistent():
    for name, entry in ZOO.items():
        assert entry.name == name
        assert entry.metric in ("top1", "char-accuracy", "agreement", "box-agreement", "map50")
        assert (entry.detection is not None) == entry.metric.startswith(("box", "map"))
        assert entry.data == "random" or entry.data.startswith("zoo:")
        assert entry.inputs and entry.summary and "\n" not in entry.summary


def test_unknown_model_error_lists_the_zoo():
    with pytest.raises(KeyError) as raised:
        get_zoo_model("yolov9")
    message = raised.value.args[0]
    assert "yolov9" in message
    assert all(f"zoo:{name}" in message for name in ZOO)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_runs_on_its_declared_input_in_eval_mode(built, name):
    model = built[name]
    assert not model.training
    with torch.no_grad():
        output = first_output(model(example(name)))
    assert tuple(output.shape) == DECLARED_OUTPUT[name]
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_runs_on_the_first_item_of_its_default_data(built, name):
    entry = ZOO[name]
    dataset = load_dataset(entry.data, 4, entry.inputs, Path("."))
    item = dataset.calibration[0]
    with torch.no_grad():
        output = first_output(built[name](*(torch.from_numpy(item[spec.name]) for spec in entry.inputs)))
    assert tuple(output.shape) == DECLARED_OUTPUT[name]
    assert (dataset.labels is not None) == (entry.metric not in ("agreement", "box-agreement"))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_builds_are_deterministic(built, name):
    again = ZOO[name].build()
    first, second = built[name].state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("name", ["crnn", "detector", "yolov4"])
def test_random_weight_batchnorm_is_not_an_identity(built, name):
    norms = [m for m in built[name].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for norm in norms:
        assert not torch.allclose(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))


def test_crnn_has_the_research_notes_layers_and_size(built):
    crnn = built["crnn"]
    convs = [(c.in_channels, c.out_channels, c.kernel_size, c.padding)
             for c in crnn.cnn if isinstance(c, torch.nn.Conv2d)]
    assert convs == [(1, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1)), (128, 256, (3, 3), (1, 1)),
                     (256, 256, (3, 3), (1, 1)), (256, 512, (3, 3), (1, 1)), (512, 512, (3, 3), (1, 1)),
                     (512, 512, (2, 2), (0, 0))]
    order = [name for name, _ in crnn.cnn.named_children()]
    for index in range(7):
        assert order.index(f"batchnorm{index}") == order.index(f"conv{index}") + 1
        assert order.index(f"relu{index}") == order.index(f"conv{index}") + 2
    pools = {name: crnn.cnn.get_submodule(name).kernel_size for name in order if name.startswith("pooling")}
    assert pools == {"pooling0": (2, 2), "pooling1": (2, 2), "pooling2": (2, 1), "pooling3": (2, 1)}
    assert order.index("pooling2") == order.index("relu3") + 1 and order.index("pooling3") == order.index("relu5") + 1
    assert (crnn.map_to_seq.in_features, crnn.map_to_seq.out_features) == (512, 64)
    assert (crnn.rnn1.input_size, crnn.rnn1.hidden_size, crnn.rnn1.bidirectional) == (64, 256, True)
    assert (crnn.rnn2.input_size, crnn.rnn2.hidden_size, crnn.rnn2.bidirectional) == (512, 256, True)
    assert (crnn.dense.in_features, crnn.dense.out_features) == (512, 42)
    state_bytes = sum(t.numel() * t.element_size() for t in crnn.state_dict().values())
    assert 30e6 < state_bytes < 33e6  # the note: ~31.4 MB FP32, ~7.85 M parameters
    assert 7.8e6 < sum(p.numel() for p in crnn.parameters()) < 7.9e6


def test_crnn_accepts_its_dynamic_axes(built):
    with torch.no_grad():
        output = built["crnn"](example("crnn", batch=4, axis3=200))
    assert tuple(output.shape) == (49, 4, 42)  # width 200 → 200/4 - 1 time steps


def test_crnn_legacy_onnx_export_holds_at_other_widths_and_batches(built, tmp_path):
    """The zoo declares batch and width dynamic; the legacy exporter must honour that."""
    import onnxruntime as ort

    crnn, path = built["crnn"], tmp_path / "crnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is deprecated in torch 2.13
        torch.onnx.export(crnn, (example("crnn"),), str(path), input_names=["image"], dynamo=False,
                          opset_version=18, dynamic_axes={"image": {0: "batch", 3: "width"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, width in [(1, 100), (1, 200), (4, 100)]:
        image = example("crnn", batch=batch, axis3=width)
        with torch.no_grad():
            expected = crnn(image).numpy()
        (actual,) = session.run(None, {"image": image.numpy()})
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def static_int8(built, tmp_path_factory):
    """name -> the model after the torch-int8-static recipe itself (FX graph mode, calibrated on the
    model's own random inputs), built once per module (the CRNN takes seconds)."""
    from optimizer.api.spec import VariantSpec
    from optimizer.console import QuietReporter
    from optimizer.engines import BuildContext, registry
    from optimizer.steps.load import LoadedModel

    converted: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in converted:
            inputs = list(ZOO[name].inputs)
            loaded = LoadedModel(source=f"zoo:{name}", format="zoo", inputs=inputs, module=built[name])
            context = BuildContext(loaded=loaded, fp32_onnx=None, export_error="not needed here",
                                   dataset=load_dataset("random", 2, inputs, Path(".")),
                                   workdir=tmp_path_factory.mktemp(f"static-{name}"), threads=1, device="cpu",
                                   hardware=None, reporter=QuietReporter())
            recipe = registry()["torch-int8-static"]
            converted[name] = recipe(context, VariantSpec(name="static", recipe="torch-int8-static")).runner.module
        return converted[name]

    return get


@pytest.mark.parametrize("name", sorted(set(ZOO) - LARGE))
def test_fx_static_quantization_traces_every_model(static_int8, name):
    quantized = static_int8(name)
    with torch.no_grad():
        output = first_output(quantized(example(name, batch=2)))
    assert tuple(output.shape)[-1] == DECLARED_OUTPUT[name][-1]
    assert torch.isfinite(output).all()


def test_fx_fuses_the_crnn_conv_bn_relu_blocks(static_int8):
    from torch.ao.nn.intrinsic.quantized import ConvReLU2d

    quantized = static_int8("crnn")
    assert all(isinstance(quantized.cnn.get_submodule(f"conv{i}"), ConvReLU2d) for i in range(7))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in quantized.modules())


def test_fx_default_mapping_leaves_textlstm_embedding_and_lstm_in_float(static_int8):
    """The default x86 mapping only quantizes the Linear: Embedding needs a weight-only qconfig
    (float_qparams_weight_only_qconfig), and FX static has no LSTM kernel. Not an error, but
    static INT8 has little to gain on this model."""
    from torch.ao.nn.quantized import Linear as QuantizedLinear

    quantized = static_int8("textlstm")
    assert type(quantized.embedding) is torch.nn.Embedding
    assert type(quantized.lstm) is torch.nn.LSTM
    assert isinstance(quantized.classifier, QuantizedLinear)


def test_digits_model_reaches_95_percent_on_the_held_out_split(built):
    _, test_images, _, test_labels = digits_split()
    with torch.no_grad():
        predicted = built["digits"](torch.from_numpy(test_images)).argmax(dim=1).numpy()
    assert (predicted == test_labels).mean() >= 0.95


def test_digits_weights_are_cached_as_safetensors_and_reused(built, zoo_cache, monkeypatch):
    from safetensors.torch import load_file

    from optimizer.zoo import digits

    cached = digits.cache_path()
    assert cached.parent.parent == zoo_cache and cached.suffix == ".safetensors"
    assert digits.VERSION in cached.name
    stored = load_file(str(cached))
    assert all(torch.equal(stored[k], v) for k, v in built["digits"].state_dict().items())
    assert not list(cached.parent.glob("*.partial"))

    def no_training():
        raise AssertionError("the second build trained instead of loading the cache")

    monkeypatch.setattr(digits, "train", no_training)
    reloaded = ZOO["digits"].build()
    assert all(torch.equal(stored[k], v) for k, v in reloaded.state_dict().items())


def test_unreadable_digits_cache_is_retrained(tmp_path, monkeypatch):
    from optimizer.zoo import digits
    from optimizer.zoo.weights import load_cached

    monkeypatch.setenv("MLOPT_CACHE", str(tmp_path))
    digits.cache_path().write_bytes(b"not a safetensors file")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        replacement = digits.DigitsCNN().eval()  # stands in for training, which takes seconds
    monkeypatch.setattr(digits, "train", lambda: replacement)
    assert digits.build() is replacement
    assert load_cached(digits.DigitsCNN(), digits.cache_path()) is not None
