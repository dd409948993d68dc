"""The GPU path. On a machine without a GPU: which recipes a CUDA run plans, that GPU recipes say why they
are skipped, that ONNX Runtime without its CUDA provider (or with compute nodes on the CPU) is a failure and
never a timing, the GPU record's schema and its absence, and the .pt2 the GPU recipes save. With a GPU
(benchmarks/gpu_check.sh runs this file there), the same recipes for real."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from optimizer.api.errors import DeviceError
from optimizer.api.results import Environment, GpuEnvironment
from optimizer.api.spec import RECOMMENDED, Recipe, VariantSpec, default_variants
from optimizer.engines import RECIPE_INFO, BuildContext, registry
from optimizer.engines.runners import (
    COMPUTE_OPS, NodePlacement, OrtRunner, ProviderError, TorchRunner, check_placement,
)
from optimizer.measure import environment
from optimizer.measure.hardware import resolve
from optimizer.steps.load import LoadedModel
from optimizer.steps.variants import build_variant

from .conftest import CONV_LSTM_INPUTS, load_user_model, save_user_model, write_spec

GPU_RECIPES = [r.value for r in Recipe if RECIPE_INFO[r.value].devices == ("cuda",) and r.value.startswith("torch-")]
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on one)")


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class Dataset:
    """The two fields of the data step's Dataset that recipes read."""

    def __init__(self, items):
        self.calibration = self.evaluation = items


def _conv_lstm(tmp_path):
    return load_user_model(tmp_path, "ConvLstm", "user_models_gpu")


def _context(tmp_path, device: str, onnx_path=None) -> BuildContext:
    from optimizer.api.spec import InputSpec

    inputs = [InputSpec(**spec) for spec in CONV_LSTM_INPUTS]
    rng = np.random.default_rng(0)
    items = [{"image": rng.random((1, 1, 8, 16), dtype=np.float32)} for _ in range(4)]
    module = _conv_lstm(tmp_path).to(device)
    loaded = LoadedModel(source="user", format="state-dict", inputs=inputs, module=module)
    return BuildContext(loaded=loaded, fp32_onnx=onnx_path, export_error=None if onnx_path else "not exported",
                        dataset=Dataset(items), workdir=tmp_path, threads=1, device=device,
                        hardware=resolve("auto", [], device))


def _onnx_model(tmp_path):
    model = _conv_lstm(tmp_path)
    path = tmp_path / "conv_lstm.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.rand(1, 1, 8, 16),), str(path), input_names=["image"], dynamo=False)
    return path


def test_a_cuda_run_plans_the_gpu_recipes_and_a_cpu_run_none_of_them():
    cuda = [v.recipe for v in default_variants("cuda")]
    assert {"torch-fp16", "torch-bf16", "torch-autocast-fp16", "torch-autocast-bf16", "torch-compile",
            "torch-cudagraphs", "torch-cudagraphs-fp16", "onnx-fp32", "onnx-fp16"} == set(cuda)
    # INT8 has no CUDA kernels for its LSTM/Conv ops; max-autotune takes minutes to build: opt-in only
    assert not any("int8" in recipe for recipe in cuda) and "torch-compile-max-autotune" not in cuda
    assert not set(GPU_RECIPES) & {r.value for r in RECOMMENDED["cpu"]}
    assert all("cuda" in RECIPE_INFO[recipe].devices for recipe in cuda)
    assert set(GPU_RECIPES) <= set(registry()) and len(GPU_RECIPES) == 8


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipes_are_skipped_on_the_cpu_with_the_reason(tmp_path, recipe):
    ctx = _context(tmp_path, "cpu")
    result, built = build_variant(ctx, VariantSpec(name=recipe, recipe=recipe), registry())
    assert built is None and result.status == "skipped"
    assert "not applicable on CPU" in result.error and "benchmark.device: cuda" in result.error


@pytest.mark.skipif(_ort_has_cuda(), reason="this onnxruntime has the CUDA provider")
def test_onnx_runtime_without_its_cuda_provider_fails_the_variant_with_the_reason(tmp_path):
    """No silent CPU fallback: the variant is failed (never timed), saying what to install."""
    ctx = _context(tmp_path, "cuda" if HAS_GPU else "cpu", onnx_path=_onnx_model(tmp_path))
    ctx.device = "cuda"  # what a CUDA run asks of ONNX Runtime, also on a machine without a GPU
    result, built = build_variant(ctx, VariantSpec(name="onnx-fp32", recipe="onnx-fp32"), registry())
    assert built is None and result.status == "failed"
    assert "no CUDAExecutionProvider" in result.error and "onnxruntime-gpu" in result.error
    assert "internal error" not in result.error
    with pytest.raises(ProviderError, match="no CUDAExecutionProvider"):
        OrtRunner(ctx.fp32_onnx, device="cuda")


def _real_placement(tmp_path) -> list[NodePlacement]:
    """Where ONNX Runtime's CPU provider ran each node of the miniature CRNN, from its profiler."""
    runner = OrtRunner(_onnx_model(tmp_path))
    return runner.placement({"image": np.random.default_rng(0).random((1, 1, 8, 16), dtype=np.float32)})


def test_compute_nodes_on_the_cpu_fail_the_cuda_check(tmp_path):
    placement = _real_placement(tmp_path)
    assert {p.op for p in placement} >= {"Conv", "LSTM"} and {p.provider for p in placement} == {"CPUExecutionProvider"}
    with pytest.raises(ProviderError) as refused:
        check_placement(placement, "CUDAExecutionProvider")
    message = str(refused.value)
    assert "CPUExecutionProvider" in message and "Conv" in message and "LSTM" in message and "not timed" in message
    # The same profile checked against the provider that did run it passes, and says so.
    note = check_placement(placement, "CPUExecutionProvider")
    assert note.startswith(f"{len(placement)} of {len(placement)} nodes ran on CPUExecutionProvider")


def test_shape_nodes_on_the_cpu_pass_the_cuda_check_and_are_named(tmp_path):
    """ONNX Runtime keeps shape computations on the CPU on purpose: only compute ops must be on the GPU."""
    placement = [NodePlacement(p.node, p.op, "CUDAExecutionProvider" if p.op in COMPUTE_OPS else p.provider)
                 for p in _real_placement(tmp_path)]
    elsewhere = [p for p in placement if p.provider != "CUDAExecutionProvider"]
    assert elsewhere, "the miniature CRNN has non-compute nodes"
    note = check_placement(placement, "CUDAExecutionProvider")
    assert f"{len(placement) - len(elsewhere)} of {len(placement)} nodes ran on CUDAExecutionProvider" in note
    assert elsewhere[0].op in note
    with pytest.raises(ProviderError, match="no node at all"):
        check_placement([], "CUDAExecutionProvider")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_without_a_gpu_there_is_no_gpu_record():
    assert environment.gpu_record() is None
    for device in ("cpu", "cuda"):
        assert environment.describe(1, device).model_dump(mode="json")["gpu"] is None


def test_the_gpu_record_has_the_fields_a_reader_needs():
    schema = GpuEnvironment.model_json_schema()
    assert {"name", "capability", "memoryGiB", "cuda", "cudnn", "torch", "tf32"} <= set(schema["required"])
    assert "driver" in schema["properties"]
    gpu = Environment.model_json_schema()["properties"]["gpu"]
    assert {"type": "null"} in gpu["anyOf"]
    # gpu_record builds the record by field name: the names it passes are exactly the schema's fields.
    tree = ast.parse(textwrap.dedent(inspect.getsource(environment.gpu_record)))
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "GpuEnvironment")
    assert {keyword.arg for keyword in call.keywords} == set(GpuEnvironment.model_fields)


def test_the_saved_program_loads_without_the_models_class(tmp_path):
    """What the GPU recipes save: the torch.export program at the variant's dtype (here on the CPU, where it
    can be checked without a GPU), loaded by a process that never saw the model's class."""
    from optimizer.engines.torch_cuda import exported

    ctx = _context(tmp_path, "cpu")
    path, notes = exported(ctx, "bfloat16", device="cpu")
    assert path.suffix == ".pt2"
    assert notes == ["saved at the declared shape (image [1, 1, 8, 16]); the spec's dynamic axes are not kept in "
                     "the .pt2"]
    item = ctx.dataset.calibration[0]["image"]
    np.save(tmp_path / "item.npy", item)
    script = textwrap.dedent(f"""
        import numpy as np, torch
        program = torch.export.load({str(path)!r}).module()
        assert all(p.dtype == torch.bfloat16 for p in program.parameters())
        item = torch.from_numpy(np.load({str(tmp_path / "item.npy")!r})).to(torch.bfloat16)
        np.save({str(tmp_path / "out.npy")!r}, program(item).detach().float().numpy())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = ctx.loaded.module(torch.from_numpy(item)).detach().numpy()
    assert np.abs(np.load(tmp_path / "out.npy") - reference).max() < 0.1  # bf16: 8 bits of mantissa


def _crnn_program(tmp_path, device: str = "cpu"):
    from optimizer.engines.torch_cuda import load_program
    from optimizer.zoo.crnn import build

    program = torch.export.export(build().to(device), (torch.rand(1, 1, 32, 100, device=device),))
    torch.export.save(program, str(tmp_path / "crnn.pt2"))
    return load_program(tmp_path / "crnn.pt2")


def test_the_recurrent_ops_of_a_loaded_program_are_found_with_their_weights(tmp_path):
    from optimizer.engines.torch_cuda import pack_recurrent_weights, recurrent_weights

    program = _crnn_program(tmp_path)
    ops = recurrent_weights(program)
    assert [(op.mode, len(op.weights), op.bidirectional, op.num_layers) for op in ops] == [("LSTM", 8, True, 1)] * 2
    assert [tuple(op.weights[0].shape) for op in ops] == [(1024, 64), (1024, 512)]  # weight_ih_l0: 4 gates × 256
    assert all(w is dict(program.named_parameters())[name] for name, w in
               zip(["rnn1.weight_ih_l0"], ops[0].weights))
    if not HAS_GPU:
        assert pack_recurrent_weights(program) == 0  # cuDNN's buffer exists only on the GPU


def test_a_cast_runner_feeds_the_dtype_and_returns_fp32(tmp_path):
    ctx = _context(tmp_path, "cpu")
    item = ctx.dataset.calibration[0]
    cast = TorchRunner(ctx.loaded.module.to(torch.bfloat16), ["image"], dtype="bfloat16")
    (output,) = cast(item)
    assert output.dtype == np.float32
    (reference,) = TorchRunner(_conv_lstm(tmp_path), ["image"])(item)
    assert 0 < np.abs(output - reference).max() < 0.1


# ---- on a GPU ------------------------------------------------------------------------------------------


@needs_gpu
def test_the_gpu_record_describes_this_gpu():
    import shutil

    record = environment.gpu_record()
    assert record.name == torch.cuda.get_device_name() and record.cuda == torch.version.cuda
    assert record.memoryGiB > 0 and record.multiprocessors > 0 and record.torch == torch.__version__
    if shutil.which("nvidia-smi"):
        assert record.driver and record.driver[0].isdigit()


@needs_gpu
def test_a_cuda_graph_replays_what_the_eager_program_computes(tmp_path):
    from optimizer.engines.runners import CudaGraphRunner

    module = _conv_lstm(tmp_path).cuda()
    eager, graphed = TorchRunner(module, ["image"], device="cuda"), CudaGraphRunner(module, ["image"], device="cuda")
    rng = np.random.default_rng(1)
    for width in (16, 16, 24):  # the second call replays; a new width is a second capture
        feed = {"image": rng.random((1, 1, 8, width), dtype=np.float32)}
        np.testing.assert_allclose(graphed(feed)[0], eager(feed)[0], rtol=1e-5, atol=1e-5)
    assert len(graphed.graphs) == 2
    run_once = graphed.bind(feed)
    run_once()


@needs_gpu
def test_packed_recurrent_weights_share_one_buffer_and_compute_the_same(tmp_path):
    from optimizer.engines.torch_cuda import pack_recurrent_weights, recurrent_weights

    program = _crnn_program(tmp_path, "cuda")
    image = torch.rand(1, 1, 32, 100, device="cuda")
    with torch.no_grad():
        before = program(image)
        assert pack_recurrent_weights(program) == 2
        after = program(image)
    torch.testing.assert_close(after, before)
    for op in recurrent_weights(program):
        storages = {w.untyped_storage().data_ptr() for w in op.weights}
        assert len(storages) == 1  # one buffer: cuDNN reads it in place, no copy per call


@pytest.mark.slow
@needs_gpu
def test_the_gpu_recipes_run_on_the_gpu_through_the_pipeline(tmp_path):
    from optimizer.api.spec_loader import load_spec
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize

    weights = save_user_model(tmp_path, "ConvLstm")
    recipes = [r for r in GPU_RECIPES if "compile" not in r] + ["onnx-fp32"]  # compiling is gpu_crnn.py's
    spec = write_spec(tmp_path, {
        "model": {"source": weights.name, "entrypoint": "user_models:ConvLstm", "inputs": CONV_LSTM_INPUTS},
        "variants": [{"name": r, "recipe": r} for r in recipes], "data": {"source": "random", "samples": 16},
        "benchmark": {"device": "cuda", "warmup": 2, "runs": 10}, "acceptance": {"maxAccuracyDrop": 0.2},
    })
    results = optimize(load_spec(spec), tmp_path / "out", tmp_path, QuietReporter())
    assert results.environment.gpu.name == torch.cuda.get_device_name()
    for variant in results.variants:
        if variant.recipe == "onnx-fp32" and not _ort_has_cuda():
            assert variant.status == "failed" and "CUDAExecutionProvider" in variant.error
            continue
        assert variant.status in ("ok", "rejected"), (variant.name, variant.error)
        assert variant.latencyMs.runs == 10 and variant.provider in ("CUDA", "CUDAExecutionProvider")
        assert (tmp_path / "out" / variant.artifact).is_file()
        if variant.runtime.startswith("pytorch"):
            assert any(note.startswith("ran on cuda") for note in variant.notes), variant.notes
        tolerance = 1e-3 if variant.recipe in ("torch-cudagraphs", "onnx-fp32") else 0.1
        assert variant.fidelity.maxAbsDiff < tolerance, (variant.name, variant.fidelity)
