"""PyTorch on the GPU: FP16/BF16 (weights cast, or autocast), torch.compile (inductor), CUDA graphs.

Every variant starts from the model captured with torch.export on the GPU at the variant's dtype and
its declared input shape, saved as `<variant>.pt2` (torch.export.save): it loads with torch.export.load,
without the model's class and without unpickling code. What is timed is that file loaded back (`.module()`), run the way
the recipe says:
- torch-fp16 / torch-bf16: weights cast; floating inputs cast on the way in, outputs back to FP32;
- torch-autocast-fp16 / -bf16: the FP32 program under torch.autocast (autocast is how it is run, so
  the saved program is FP32 and the lineage says which autocast);
- torch-compile: the FP32 program through torch.compile (inductor, default mode);
  torch-compile-max-autotune: mode max-autotune, which autotunes GEMM/conv kernels and runs them from
  inductor's CUDA graphs. The exported program is compiled, not the module: dynamo graph-breaks on
  nn.LSTM/GRU and, in torch 2.11-2.13, then runs the whole forward eagerly (pytorch#141184); in the
  exported program an LSTM is one aten op that inductor decomposes and compiles. Compiled at build
  time, never timed; inductor's code is not saved, it is rebuilt where the program is deployed;
- torch-cudagraphs / -fp16: the program's kernels captured once per input shape into a CUDA graph and
  replayed (runners.CudaGraphRunner): one launch per inference instead of one per kernel, for static
  shapes (batch-1 serving has them). cuDNN still runs the LSTMs, as in eager mode.
"""

from __future__ import annotations

import copy
import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from optimizer.api.spec import Recipe, VariantSpec
from optimizer.engines import BuildContext, Built, NotApplicable, RecipeFailure
from optimizer.engines.runners import CompiledTorchRunner, CudaGraphRunner, TorchRunner, flat_tensors
from optimizer.engines.torch_export import quiet, root_cause

INSTEAD = "the other GPU recipes (torch-fp16, torch-cudagraphs) or the ONNX ones (onnx-fp32, onnx-fp16) may apply"


@dataclass(frozen=True)
class GpuPlan:
    """How one GPU recipe runs the exported program."""

    dtype: str = "float32"  # of the weights and the saved program
    autocast: str | None = None  # run under torch.autocast at this dtype
    compile_mode: str | None = None  # torch.compile mode: default, max-autotune
    cuda_graph: bool = False  # replayed from CUDA graphs captured per input shape


def _require_cuda(ctx: BuildContext) -> None:
    if ctx.device != "cuda":
        raise NotApplicable("not applicable on CPU: a GPU recipe; set benchmark.device: cuda on a node with an "
                            "NVIDIA GPU")
    if ctx.loaded.module is None:
        raise NotApplicable("needs a PyTorch model; an ONNX model gets ONNX Runtime's CUDA provider (onnx-fp32, "
                            "onnx-fp16)")
    if ctx.loaded.format == "torchscript":
        raise NotApplicable("needs a PyTorch module or a torch.export .pt2 (torch.export cannot capture a "
                            "TorchScript module); give a state-dict with model.entrypoint, or a .pt2")


def _placed(tensors, device: str, dtype: str) -> tuple:
    """Example tensors on `device`, the floating ones at `dtype`."""
    import torch

    return tuple(t.to(device=device, dtype=getattr(torch, dtype)) if t.is_floating_point() else t.to(device)
                 for t in tensors)


def _declared_example(ctx: BuildContext) -> tuple:
    import torch

    first = ctx.dataset.calibration[0]
    return tuple(torch.from_numpy(first[spec.name]) for spec in ctx.loaded.inputs)


def exported(ctx: BuildContext, dtype: str, device: str = "cuda") -> tuple[Path, list[str]]:
    """The model captured by torch.export on `device` with weights at `dtype`, at the declared input shape,
    saved as a .pt2 (once per dtype: the variants that share it copy the file), and notes about it.

    At the declared shape, not the spec's dynamic axes: exported from a size-2 example, the CRNN's program
    holds guards that its declared batch of 1 fails (torch 2.13), and a CUDA graph is one shape anyway."""
    key = f"torch-export-{device}-{dtype}"
    if key not in ctx.cache:
        import torch

        module = copy.deepcopy(ctx.loaded.module).to(device=device, dtype=getattr(torch, dtype)).eval()
        try:
            with quiet():
                program = torch.export.export(module, _placed(_declared_example(ctx), device, dtype))
        except Exception as error:
            raise RecipeFailure(f"torch.export cannot capture this model ({root_cause(error)}); {INSTEAD}") from None
        path = ctx.workdir / f"{key}.pt2"
        with quiet():
            torch.export.save(program, str(path))
        shapes = ", ".join(f"{spec.name} {list(spec.shape)}" for spec in ctx.loaded.inputs)
        notes = [f"saved at the declared shape ({shapes}); the spec's dynamic axes are not kept in the .pt2"
                 ] if any(spec.dynamicAxes for spec in ctx.loaded.inputs) else []
        ctx.cache[key] = (path, notes)
    path, notes = ctx.cache[key]
    return path, list(notes)


def load_program(path: Path):
    """A saved .pt2 as a callable module on the device it was saved from (the GPU here)."""
    import torch

    with quiet():
        return torch.export.load(str(path)).module()


@dataclass(frozen=True)
class RecurrentWeights:
    """One aten LSTM/GRU/RNN op of an exported program and the weight tensors it reads, in cuDNN's order."""

    mode: str  # LSTM, GRU, RNN_TANH, RNN_RELU (torch.backends.cudnn.rnn.get_cudnn_mode)
    weights: list
    has_biases: bool
    num_layers: int
    bidirectional: bool
    batch_first: bool


def recurrent_weights(module) -> list[RecurrentWeights]:
    """The recurrent ops of a loaded program (`torch.export.load(...).module()`) whose weights are plain
    attributes of it; ops with projections (proj_size) are left out."""
    import torch

    aten = torch.ops.aten
    modes = {aten.lstm.input: "LSTM", aten.gru.input: "GRU", aten.rnn_tanh.input: "RNN_TANH",
             aten.rnn_relu.input: "RNN_RELU"}
    found = []
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target not in modes:
            continue
        # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        params, has_biases, num_layers, _, _, bidirectional, batch_first = node.args[2:9]
        if not all(getattr(param, "op", None) == "get_attr" for param in params):
            continue
        per_layer = (4 if has_biases else 2) * (2 if bidirectional else 1)
        if len(params) != per_layer * num_layers:
            continue  # projections add a weight per layer: cuDNN's layout for those is not handled here
        weights = [functools.reduce(getattr, param.target.split("."), module) for param in params]
        found.append(RecurrentWeights(modes[node.target], weights, has_biases, num_layers, bidirectional, batch_first))
    return found


def pack_recurrent_weights(module) -> int:
    """Pack each recurrent op's weights into one contiguous buffer, in place, as nn.LSTM.flatten_parameters
    does: cuDNN reads them from one buffer, and a program loaded by torch.export.load holds them as separate
    tensors, which would be copied into a fresh buffer on every call. Returns the ops packed (0 off cuDNN)."""
    import torch
    import torch.backends.cudnn.rnn as cudnn_rnn

    if not (torch.backends.cudnn.is_available() and torch._use_cudnn_rnn_flatten_weight()):
        return 0
    packed = 0
    for op in recurrent_weights(module):
        weights = op.weights
        acceptable = all(w.is_cuda and w.dtype == weights[0].dtype and torch.backends.cudnn.is_acceptable(w)
                         for w in weights)
        if not acceptable or len({w.data_ptr() for w in weights}) != len(weights):
            continue
        with torch.cuda.device_of(weights[0]), torch.no_grad():
            torch._cudnn_rnn_flatten_weight(weights, 4 if op.has_biases else 2, weights[0].shape[1],
                                            cudnn_rnn.get_cudnn_mode(op.mode), weights[1].shape[1], 0,
                                            op.num_layers, op.batch_first, op.bidirectional)
        packed += 1
    return packed


def ran_on(runner: TorchRunner, feed: dict) -> str:
    """The devices the outputs of one run came back on, and the GPU's name: RecipeFailure unless all
    of them are CUDA (a program that ran on the CPU must never be timed as a GPU variant)."""
    import torch

    tensors = runner.tensors(feed)
    with runner.context():
        outputs = flat_tensors(runner.module(*tensors))
    devices = sorted({str(t.device) for t in outputs if hasattr(t, "device")})
    if not devices or any(not device.startswith("cuda") for device in devices):
        raise RecipeFailure(f"the program's outputs came back on {', '.join(devices) or 'no device'}, not the GPU; "
                            "it is not timed as a GPU variant")
    return f"ran on {', '.join(devices)} ({torch.cuda.get_device_name()})"


def _compile_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]


def compiled_now(runner: CompiledTorchRunner, feed: dict, mode: str) -> str:
    """Compile at the declared shape now (the first call), never during timing; what inductor did."""
    graphs, skips = _compile_counts()
    started = time.perf_counter()
    try:
        with quiet():
            runner(feed)
    except Exception as error:
        raise RecipeFailure(f"torch.compile (inductor, mode {mode}) failed on the GPU ({root_cause(error)}); inductor's "
                            f"GPU kernels need Triton and a C compiler for its launchers; {INSTEAD}") from None
    seconds = time.perf_counter() - started
    graphs, skips = _compile_counts()[0] - graphs, _compile_counts()[1] - skips
    note = (f"inductor compiled {graphs} graph(s) in {seconds:.1f} s at build time (not timed); the saved .pt2 is "
            "the program it compiled, compiled again where it is deployed")
    if skips:
        note += f"; inductor left {skips} graph(s) out of its CUDA graphs (it logs why)"
    return note


def _captured_now(runner: CudaGraphRunner, feed: dict) -> None:
    try:
        runner(feed)  # captures at the declared shape
    except Exception as error:
        raise RecipeFailure(f"CUDA graph capture failed ({root_cause(error)}): the program runs something a CUDA "
                            "graph cannot hold (a host synchronisation, a CPU tensor, data-dependent shapes); "
                            f"{INSTEAD}") from None


def _build(ctx: BuildContext, variant: VariantSpec, plan: GpuPlan) -> Built:
    _require_cuda(ctx)
    import torch

    source, notes = exported(ctx, plan.dtype)
    artifact = ctx.workdir / f"{variant.name}.pt2"
    shutil.copyfile(source, artifact)
    module = load_program(artifact)  # what is timed is what was saved
    try:
        packed = pack_recurrent_weights(module)
    except Exception as error:  # only a speed-up: without it cuDNN copies the weights on each call
        notes.append(f"recurrent weights not packed for cuDNN ({root_cause(error)}): each call copies them")
        packed = 0
    if packed:
        notes.append(f"packed the weights of {packed} recurrent op(s) into cuDNN's single buffer after loading "
                     "(as nn.LSTM.flatten_parameters does), so no call copies them")
    names, feed = [spec.name for spec in ctx.loaded.inputs], ctx.dataset.calibration[0]
    cast = plan.dtype if plan.dtype != "float32" else None
    options = {"saved": "torch.export .pt2 (torch.export.load)", "weights": plan.dtype,
               "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}}
    if plan.compile_mode:
        runner = CompiledTorchRunner(torch.compile(module, mode=plan.compile_mode), names, device="cuda", dtype=cast)
        notes.append(compiled_now(runner, feed, plan.compile_mode))
        options.update(compiler="torch.compile (inductor)", mode=plan.compile_mode)
    elif plan.cuda_graph:
        runner = CudaGraphRunner(module, names, device="cuda", dtype=cast)
        _captured_now(runner, feed)
        options["cudaGraph"] = "captured once per input shape, replayed"
    else:
        runner = TorchRunner(module, names, device="cuda", dtype=cast, autocast=plan.autocast)
        if plan.autocast:
            options["autocast"] = plan.autocast
    notes.append(ran_on(runner, feed))
    return Built(runner, artifact, parent="pytorch-fp32", options=options, notes=notes)


# Each GPU recipe is one plan for the exported program (registered in optimizer/engines/__init__.py).
PLANS: dict[str, GpuPlan] = {
    Recipe.torch_fp16.value: GpuPlan(dtype="float16"),
    Recipe.torch_bf16.value: GpuPlan(dtype="bfloat16"),
    Recipe.torch_autocast_fp16.value: GpuPlan(autocast="float16"),
    Recipe.torch_autocast_bf16.value: GpuPlan(autocast="bfloat16"),
    Recipe.torch_compile.value: GpuPlan(compile_mode="default"),
    Recipe.torch_compile_max_autotune.value: GpuPlan(compile_mode="max-autotune"),
    Recipe.torch_cudagraphs.value: GpuPlan(cuda_graph=True),
    Recipe.torch_cudagraphs_fp16.value: GpuPlan(dtype="float16", cuda_graph=True),
}


def torch_on_gpu(ctx: BuildContext, variant: VariantSpec) -> Built:
    """Any of the PLANS, by the variant's recipe."""
    return _build(ctx, variant, PLANS[variant.recipe])
