"""PyTorch INT8 through torchao's PT2E flow: torch.export, X86InductorQuantizer, torch.compile.

torch.ao.quantization (optimizer/engines/torch_ao.py) is deprecated in torch 2.13; its successor
is torchao's PT2E flow, and these recipes are it:
- `torchao-pt2e-int8-static`: the model captured with torch.export (the spec's dynamic axes stay
  dynamic), annotated by X86InductorQuantizer (per-channel int8 weights, uint8 activations),
  calibrated on the spec's calibration data, converted;
- `torchao-pt2e-int8-dynamic`: the same quantizer in dynamic mode: activation ranges are computed
  on every call, so there is nothing to calibrate.
The converted program is run through torch.compile (inductor) with freezing on, which folds the
int8 weights into oneDNN's prepacked INT8 convolutions and linears. The first compile happens at
build time, at the declared shape, and is never timed (optimizer.engines.runners.CompiledTorchRunner).

Saved: `<variant>.pt2`, the converted program (int8 weights between quantize/dequantize ops)
written with torch.export.save; the variant's size is that file. It loads with torch.export.load
once torchao is imported (which registers the quantized ops) and deploys as it was timed here:
torch.compile with `torch._inductor.config.freezing = True`. Inductor's compiled code is not saved:
it is rebuilt on the machine that runs it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path

from optimizer.engines import BuildContext, Built, NotApplicable, RecipeFailure
from optimizer.engines.runners import CompiledTorchRunner
from optimizer.engines.torch_export import dynamic_shapes, quiet
from optimizer.api.spec import VariantSpec

# PT2E's INT8 weight prepacking is an inductor freezing pass: without freezing the int8 weights
# are dequantized on every call and the convolutions run in FP32.
INDUCTOR_CONFIG = {"freezing": True}
INSTEAD = "use torch-int8-static or ort-int8-static for this model"

def _require_pt2e(ctx: BuildContext) -> None:
    if ctx.device != "cpu":
        raise NotApplicable("not applicable on CUDA: X86InductorQuantizer's INT8 kernels (oneDNN) run on x86 CPUs")
    if ctx.loaded.format in ("onnx", "torchscript"):
        raise NotApplicable(
            f"needs a PyTorch module or a torch.export .pt2; a model loaded as {ctx.loaded.format} supports the ONNX "
            "recipes (give a state-dict with model.entrypoint, or a .pt2, to also get PT2E quantization)"
        )
    try:
        with quiet():
            import torchao  # noqa: F401
    except ImportError as error:
        raise NotApplicable(f"skipped (not installed): {error.name} is missing; pip install 'mlopt[optimizer]' "
                            "brings torchao") from None


def _captured(ctx: BuildContext):
    """The model as a torch.export graph module, the input prepare_pt2e takes."""
    import torch

    from optimizer.engines.torch_export import dynamic_example, root_cause

    if ctx.loaded.program is not None:  # a .pt2 source is already captured
        return copy.deepcopy(ctx.loaded.program.module())
    module = copy.deepcopy(ctx.loaded.module).eval()
    try:
        with quiet():
            program = torch.export.export(module, dynamic_example(ctx.loaded.inputs),
                                          dynamic_shapes=dynamic_shapes(ctx.loaded.inputs))
    except Exception as error:
        raise RecipeFailure(
            f"torch.export cannot capture this model ({root_cause(error)}); PT2E quantization starts from a "
            f"torch.export graph, so {INSTEAD}"
        ) from None
    return program.module()


def _quantized(ctx: BuildContext, captured, dynamic: bool):
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    from optimizer.engines.torch_export import root_cause

    # Without VNNI, uint8×int8 products are summed in 16 bits and saturate (optimizer/measure/hardware.py):
    # reduce_range keeps the activations to 7 bits there, as torchao's own docstring advises.
    config = x86.get_default_x86_inductor_quantization_config(is_dynamic=dynamic,
                                                               reduce_range=ctx.hardware.reduce_range)
    try:
        with quiet():
            prepared = prepare_pt2e(captured, x86.X86InductorQuantizer().set_global(config))
    except Exception as error:
        raise RecipeFailure(f"X86InductorQuantizer cannot annotate this model ({root_cause(error)}); {INSTEAD}") from None
    if not dynamic:
        names = [spec.name for spec in ctx.loaded.inputs]
        items = ctx.dataset.calibration
        with ctx.reporter.task("calibrating observers (torchao PT2E)", len(items)) as advance, torch.no_grad():
            for item in items:
                prepared(*(torch.from_numpy(item[n]) for n in names))
                advance()
    with quiet():
        return convert_pt2e(prepared)


def drop_unused_weights(converted) -> None:
    """convert_pt2e adds the int8 weights beside the FP32 ones it replaced and leaves those
    registered: torch.export would save both (the CRNN's .pt2 was 37 MB, bigger than FP32's 31)."""
    used = {node.target for node in converted.graph.nodes if node.op == "get_attr"}
    for name, _ in [*converted.named_parameters(), *converted.named_buffers()]:
        if name not in used:
            owner, _, attribute = name.rpartition(".")
            delattr(converted.get_submodule(owner), attribute)


def _save(ctx: BuildContext, variant: VariantSpec, converted) -> Path:
    """The converted program as a torch.export .pt2 (int8 weights, quantize/dequantize ops)."""
    import torch

    from optimizer.engines.torch_export import dynamic_example, root_cause

    path = ctx.workdir / f"{variant.name}.pt2"
    drop_unused_weights(converted)
    try:
        with quiet():
            program = torch.export.export(converted, dynamic_example(ctx.loaded.inputs),
                                          dynamic_shapes=dynamic_shapes(ctx.loaded.inputs))
            torch.export.save(program, str(path))
    except Exception as error:
        raise RecipeFailure(f"the quantized program could not be saved with torch.export ({root_cause(error)}); "
                            f"{INSTEAD}") from None
    return path


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps (dynamo keeps the backend's exception in `inner_exception`)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__


def _compile_failure(error: BaseException) -> str:
    """What a user can do about a torch.compile failure: a missing C++ compiler is the common one."""
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    from optimizer.engines.torch_export import root_cause

    chain = list(_causes(error))
    missing = next((e for e in chain if isinstance(e, InvalidCxxCompiler)), None)
    if missing is not None:
        return (f"torch.compile needs a C++ compiler for inductor's CPU kernels ({str(missing)[:200]}); install one "
                f"(apt-get install g++) or point the CXX environment variable at it, or {INSTEAD}")
    broken = next((e for e in chain if isinstance(e, CppCompileError)), None)
    if broken is not None:
        first = (str(broken).strip().splitlines() or [""])[0][:200]
        return (f"the C++ compiler failed on inductor's generated kernels ({first}); check that CXX names a "
                f"working g++ or clang++, or {INSTEAD}")
    return f"torch.compile (inductor) failed on the PT2E-quantized model ({root_cause(error)}); {INSTEAD}"


def _compiled(ctx: BuildContext, converted) -> tuple[CompiledTorchRunner, float]:
    """The converted program compiled by inductor, first call made: (runner, compile seconds)."""
    import torch

    runner = CompiledTorchRunner(torch.compile(converted, backend="inductor"),
                                 [spec.name for spec in ctx.loaded.inputs], inductor_config=INDUCTOR_CONFIG)
    started = time.perf_counter()
    try:
        with quiet():
            runner(ctx.dataset.calibration[0])  # compiles at the declared shape, before any timing
    except Exception as error:
        raise RecipeFailure(_compile_failure(error)) from None
    return runner, time.perf_counter() - started


def _pt2e(ctx: BuildContext, variant: VariantSpec, dynamic: bool) -> Built:
    _require_pt2e(ctx)
    converted = _quantized(ctx, _captured(ctx), dynamic)
    path = _save(ctx, variant, converted)
    runner, seconds = _compiled(ctx, converted)
    options = {"quantizer": "X86InductorQuantizer", "mode": "dynamic" if dynamic else "static",
               "reduceRange": ctx.hardware.reduce_range, "compiler": "torch.compile (inductor, freezing)",
               "captured": "torch.export .pt2 source" if ctx.loaded.program is not None else "torch.export"}
    if not dynamic:
        options["calibrationSamples"] = len(ctx.dataset.calibration)
    return Built(runner, path, parent="pytorch-fp32", options=options,
                 notes=[f"inductor compiled it in {seconds:.1f} s at build time (not timed); the saved .pt2 is the "
                        "quantized program, compiled again where it is deployed"])


def torchao_pt2e_int8_static(ctx: BuildContext, variant: VariantSpec) -> Built:
    return _pt2e(ctx, variant, dynamic=False)


def torchao_pt2e_int8_dynamic(ctx: BuildContext, variant: VariantSpec) -> Built:
    return _pt2e(ctx, variant, dynamic=True)
