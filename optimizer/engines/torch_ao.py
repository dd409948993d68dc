"""PyTorch recipes (torch.ao.quantization): the research note's dynamic, static and static+dynamic.

torch.ao.quantization is deprecated in torch 2.13 (its PT2E flow moved to torchao) but still
works; we pin torch and test these recipes. Static quantization uses FX graph mode, which fuses
Conv+BN+ReLU and places quant/dequant stubs itself, so any FX-traceable model works without edits.
"""

from __future__ import annotations

import copy
import warnings

from optimizer.engines import BuildContext, Built, NotApplicable, RecipeFailure
from optimizer.engines.runners import TorchRunner
from optimizer.api.spec import VariantSpec

ENGINE = "x86"  # fbgemm + onednn kernels, the right choice for x86-64 servers


def _require_eager(ctx: BuildContext):
    if ctx.device == "cuda":
        raise NotApplicable("not applicable on CUDA: PyTorch's INT8 kernels (torch.ao) run on CPU only")
    if not ctx.loaded.is_eager:
        raise NotApplicable(
            f"needs the model's Python class; a {ctx.loaded.format} model supports the ONNX recipes "
            "(give a state-dict with model.entrypoint to also get PyTorch quantization)"
        )
    import torch

    torch.backends.quantized.engine = ENGINE
    return copy.deepcopy(ctx.loaded.module).eval()


def _example(ctx: BuildContext) -> tuple:
    """The first calibration item as the model's positional tensors (tracing needs an example)."""
    import torch

    first = ctx.dataset.calibration[0]
    return tuple(torch.from_numpy(first[spec.name]) for spec in ctx.loaded.inputs)


def fx_prepare(prepare, module, qconfig_mapping, example: tuple):
    """FX graph mode's `prepare` (prepare_fx, or prepare_qat_fx for QAT): a model FX cannot trace is
    a recipe failure that says which recipe works instead."""
    try:
        return prepare(module, qconfig_mapping, example)
    except Exception as error:
        raise RecipeFailure(
            f"FX graph mode cannot trace this model ({type(error).__name__}: {str(error)[:200]}); "
            "use the ort-int8-static recipe instead"
        ) from None


def _save(ctx: BuildContext, variant: VariantSpec, module):
    """Save as TorchScript: it loads without the model's class and without unpickling code
    (a quantized state_dict needs torch.load(weights_only=False), which we never ask of users)."""
    import torch

    path = ctx.workdir / f"{variant.name}.pt"
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in 2.13 but the format is what loads safely
        torch.jit.save(torch.jit.trace(module, _example(ctx), check_trace=False), str(path))
    return path


def _without_mha_fast_path(module):
    """nn.TransformerEncoderLayer's inference fast path reads `linear1.weight.device`; on a
    dynamically quantized Linear `weight` is a method, so the fast path crashes. Run such models
    on the regular path (the same arithmetic, the quantized Linears still used)."""
    import torch

    if not any(isinstance(m, (torch.nn.TransformerEncoderLayer, torch.nn.MultiheadAttention)) for m in module.modules()):
        return module

    class RegularPath(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            previous = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                return self.inner(*args)
            finally:
                torch.backends.mha.set_fastpath_enabled(previous)

    return RegularPath(module)


def _dynamic(module):
    import torch
    from torch.ao.quantization import quantize_dynamic

    quantized = quantize_dynamic(module, {torch.nn.Linear, torch.nn.LSTM, torch.nn.GRU}, dtype=torch.qint8)
    return _without_mha_fast_path(quantized)


def _static(ctx: BuildContext, module):
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    names = [spec.name for spec in ctx.loaded.inputs]
    prepared = fx_prepare(prepare_fx, module, get_default_qconfig_mapping(ENGINE), _example(ctx))
    items = ctx.dataset.calibration
    with ctx.reporter.task("calibrating observers (torch.ao FX)", len(items)) as advance, torch.inference_mode():
        for item in items:
            prepared(*(torch.from_numpy(item[n]) for n in names))
            advance()
    return convert_fx(prepared)


def _built(ctx: BuildContext, variant: VariantSpec, module, options: dict) -> Built:
    runner = TorchRunner(module, [spec.name for spec in ctx.loaded.inputs])
    return Built(runner, _save(ctx, variant, module), parent="pytorch-fp32", options={"engine": ENGINE, **options})


def torch_int8_dynamic(ctx: BuildContext, variant: VariantSpec) -> Built:
    module = _require_eager(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = _dynamic(module)
    return _built(ctx, variant, quantized, {"dynamic": ["Linear", "LSTM", "GRU"]})


def torch_int8_static(ctx: BuildContext, variant: VariantSpec) -> Built:
    module = _require_eager(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = _static(ctx, module)
    built = _built(ctx, variant, quantized, {"mode": "fx", "qconfig": f"default {ENGINE}"})
    ctx.cache[STATIC_BUILT] = variant.name  # torch-int8-static-dynamic is this model when there is no LSTM/GRU
    return built


STATIC_BUILT = "torch-int8-static built"


def _recurrent(module) -> bool:
    import torch

    return any(isinstance(m, (torch.nn.LSTM, torch.nn.GRU)) for m in module.modules())


def torch_int8_static_dynamic(ctx: BuildContext, variant: VariantSpec) -> Built:
    import torch
    from torch.ao.quantization import quantize_dynamic

    if ctx.cache.get(STATIC_BUILT) and ctx.loaded.module is not None and not _recurrent(ctx.loaded.module):
        raise NotApplicable(f"the model has no LSTM/GRU, so this is the same model as {ctx.cache[STATIC_BUILT]}: "
                            "not built twice")
    module = _require_eager(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # FX static leaves LSTM/GRU as float modules between dequant/quant; swap those for
        # dynamically quantized ones, as the note's "static + dynamic" column did.
        quantized = quantize_dynamic(_static(ctx, module), {torch.nn.LSTM, torch.nn.GRU}, dtype=torch.qint8)
        quantized = _without_mha_fast_path(quantized)
    return _built(ctx, variant, quantized, {"mode": "fx", "dynamic": ["LSTM", "GRU"]})
