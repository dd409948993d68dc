"""torchao's PT2E INT8 (torch.export + X86InductorQuantizer + torch.compile): built, timed and checked
like every other variant, and a model it cannot take is a message, not a crash."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import QUICK_BENCHMARK, save_user_model, write_spec
from .test_model_matrix import ARCHITECTURES, save_model

PT2E_RECIPES = ["torchao-pt2e-int8-static", "torchao-pt2e-int8-dynamic"]


def _optimize(tmp_path, model: dict, recipes: list[str]):
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.api.spec_loader import load_spec

    spec = write_spec(tmp_path, {"model": model, "variants": [{"name": r, "recipe": r} for r in recipes],
                                 "data": {"samples": 16}, "benchmark": QUICK_BENCHMARK,
                                 "acceptance": {"maxAccuracyDrop": 0.5}})
    return optimize(load_spec(spec), tmp_path / "out", tmp_path, QuietReporter())


@pytest.fixture(scope="module")
def pt2e_run(tmp_path_factory):
    """Both PT2E recipes on the conv + BN + ReLU classifier (a user's state_dict), one pipeline run."""
    directory = tmp_path_factory.mktemp("pt2e")
    results = _optimize(directory, save_model(directory, "conv-bn-relu", "state-dict"), PT2E_RECIPES)
    return results, directory / "out"


def test_pt2e_variants_are_built_timed_and_agree_with_fp32(pt2e_run):
    results, out = pt2e_run
    for name in PT2E_RECIPES:
        variant = results.variant(name)
        assert variant.status in ("ok", "rejected"), (name, variant.error)
        assert variant.runtime == "pytorch-inductor" and variant.lineage.parent == "pytorch-fp32"
        assert variant.latencyMs.mean > 0 and variant.latencyMs.runs == QUICK_BENCHMARK["runs"]
        # INT8 arithmetic, so not bit-equal, but the same function: close outputs, same decisions.
        assert variant.fidelity.cosine > 0.99 and variant.fidelity.argmaxAgreement >= 0.75, variant.fidelity
        assert 0 < variant.fidelity.maxAbsDiff < 0.1  # > 0: the INT8 program ran, not FP32 again
        assert variant.artifact.endswith(".pt2") and variant.sizeBytes == (out / variant.artifact).stat().st_size
    static = results.variant("torchao-pt2e-int8-static").lineage.options
    assert static["mode"] == "static" and static["calibrationSamples"] == 8  # half of data.samples
    assert results.variant("torchao-pt2e-int8-dynamic").lineage.options["mode"] == "dynamic"
    assert "## Quantization with torchao (PT2E)" in (out / "report.md").read_text()


def test_saved_pt2_is_the_quantized_program_with_the_dynamic_batch_kept(pt2e_run):
    import torch
    import torchao  # noqa: F401  (registers the quantized ops the program calls)

    results, out = pt2e_run
    program = torch.export.load(str(out / results.variant("torchao-pt2e-int8-static").artifact))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("quantize_per_tensor" in t for t in targets) and any("dequantize_per_channel" in t for t in targets)
    int8_weights = [t for t in program.state_dict.values() if t.dtype == torch.int8] + \
                   [t for t in program.constants.values() if isinstance(t, torch.Tensor) and t.dtype == torch.int8]
    assert int8_weights, "the weights should be stored as int8"
    # ...and only as int8: the FP32 convolution weights they replaced are not saved beside them.
    assert not [name for name, t in program.state_dict.items() if t.dtype == torch.float32 and t.dim() == 4]
    _, inputs = ARCHITECTURES["conv-bn-relu"]
    batch = torch.rand(4, *inputs[0]["shape"][1:])  # the spec declares axis 0 dynamic
    assert program.module()(batch).shape == (4, 5)


@pytest.mark.slow  # the whole pipeline
@pytest.mark.parametrize("fmt", ["exported-program", "onnx"])
def test_a_pt2_source_is_quantized_as_it_is_and_an_onnx_source_is_skipped(tmp_path, fmt):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the user's own export, not what is under test
        model = save_model(tmp_path, "conv-bn-relu", fmt)
    results = _optimize(tmp_path, model, ["torchao-pt2e-int8-static"])
    variant = results.variant("torchao-pt2e-int8-static")
    if fmt == "exported-program":
        assert variant.status in ("ok", "rejected") and variant.fidelity.cosine > 0.99, (variant.error, variant.fidelity)
        assert variant.lineage.options["captured"] == "torch.export .pt2 source"
    else:
        assert variant.status == "skipped" and variant.error.startswith("needs a PyTorch module or a torch.export .pt2")


def test_compiled_runner_compiles_a_new_shape_before_it_is_timed():
    """bind() makes the compiling call itself, under the runner's inductor config, so the timed
    calls neither compile nor run with a config patch around them."""
    import torch._inductor.config as inductor_config

    from optimizer.engines.runners import CompiledTorchRunner

    calls = []

    def module(x):
        calls.append((tuple(x.shape), inductor_config.freezing))
        return x * 2

    runner = CompiledTorchRunner(module, ["x"], inductor_config={"freezing": True})
    run_once = runner.bind({"x": np.ones((3, 2), np.float32)})
    assert calls == [((3, 2), True)]  # the untimed first call, config patched
    run_once()
    assert calls[-1] == ((3, 2), inductor_config.freezing) and len(calls) == 2  # timed: no patch, no extra call
    runner.bind({"x": np.ones((3, 2), np.float32)})
    assert len(calls) == 2  # that shape is compiled already
    np.testing.assert_array_equal(runner({"x": np.ones((1, 2), np.float32)})[0], np.full((1, 2), 2.0))


@pytest.mark.slow  # the whole pipeline
def test_a_model_torch_export_cannot_capture_fails_that_recipe_only(tmp_path):
    weights = save_user_model(tmp_path, "DataBranch")  # branches on a tensor's value
    results = _optimize(tmp_path, {"source": weights.name, "entrypoint": "user_models:DataBranch",
                                   "inputs": [{"name": "x", "shape": [1, 4]}]},
                        ["torchao-pt2e-int8-static", "torch-int8-dynamic"])
    failed = results.variant("torchao-pt2e-int8-static")
    assert failed.status == "failed" and failed.error.startswith("torch.export cannot capture this model"), failed.error
    assert "internal error" not in failed.error and "ort-int8-static" in failed.error  # says what to use instead
    assert results.variant("torch-int8-dynamic").status == "ok"  # the run went on


@pytest.mark.slow  # the whole pipeline
def test_without_a_cxx_compiler_the_variant_says_how_to_get_one(tmp_path, monkeypatch):
    """Inductor writes C++ kernels and compiles them: a machine without g++ gets a message, not a crash."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/g++",))
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)  # a cached kernel needs no compiler
    results = _optimize(tmp_path, save_model(tmp_path, "conv-bn-relu", "state-dict"), ["torchao-pt2e-int8-static"])
    failed = results.variant("torchao-pt2e-int8-static")
    assert failed.status == "failed", failed
    assert failed.error.startswith("torch.compile needs a C++ compiler") and "/nonexistent/g++" in failed.error
    assert "CXX" in failed.error and "internal error" not in failed.error
