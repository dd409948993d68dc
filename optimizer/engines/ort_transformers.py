"""ONNX Runtime recipes for transformers and other MatMul-heavy models: the transformer optimizer's fused
graph (FP32 and dynamic INT8 on top of it) and 4-bit weight-only MatMulNBits.

Fusion (`onnxruntime.transformers.optimizer.optimize_model`) turns attention subgraphs, LayerNorm+Add and
Gelu into ORT's contrib ops (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization). Its
patterns follow the TorchScript exporter's graphs: the dynamo export's attention is not matched (0 of 4
Attention fused on a 4-layer BERT here, 4 of 4 with `export.exporter: legacy`). Static INT8 belongs before
fusion (fused ops are not statically quantized: onnxruntime#8770), so ort-int8-static stays the static
recipe; dynamic INT8 does cover Attention, so it is the INT8 step on the fused graph.

4-bit weight-only (`MatMulNBitsQuantizer`) writes `com.microsoft.MatMulNBits`: weights in blocks with one
scale each, activations FP32 (or int8 inside the kernel at accuracy level 4, what Microsoft's CPU models
ship with: `int4-rtn-block-32-acc-level-4`). Its quantizer reads MatMul (and Gather) only, so Gemm nodes with
constant weights (GPT-2's Conv1D layers, most Linear layers with a bias in the dynamo export) are written as
MatMul + Add first. It pays off where weights are memory-bound: token-by-token generation and big
projections; a model whose weights sit elsewhere (convolutions, LSTMs) is not MatMul-heavy and is skipped.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from optimizer.api.spec import Recipe, VariantSpec
from optimizer.artifacts import onnx_files
from optimizer.engines import BuildContext, Built, NotApplicable, RecipeFailure
from optimizer.engines.ort import _dynamic, _runner, basic_optimized, ort_source

# transformers' model_type -> the transformer optimizer's model type (architectures it fuses alike)
MODEL_TYPES = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "albert",
                     "mpnet", "ernie"), "bert"),
    **dict.fromkeys(("vit", "deit", "dinov2"), "vit"),
    "gpt2": "gpt2", "gpt_neox": "gpt_neox", "phi": "phi", "qwen3": "qwen3", "bart": "bart", "t5": "t5",
    "clip": "clip", "swin": "swin",
}
FUSED_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
INT4_OP_TYPES = ["MatMul", "Gather"]  # Gather: the token embeddings
PACKED = ("MatMul", "Gemm", "Gather")  # whose weights 4-bit weight-only packs
MATMUL_HEAVY = 0.5  # share of the weights in MatMul/Gemm/Gather for 4-bit weight-only to apply


def transformer_type(ctx: BuildContext, ops: Counter) -> tuple[str, int, int, str]:
    """(the optimizer's model type, heads, hidden size, where they came from); 0 lets it read them off the graph."""
    module = getattr(ctx.loaded.module, "model", None)
    config = getattr(module, "config", None) if ctx.loaded.format == "huggingface" else None
    if config is not None:
        model_type = MODEL_TYPES.get(config.model_type)
        if model_type is None:
            raise NotApplicable(f"ONNX Runtime's transformer optimizer has no fusions for model_type "
                                f"{config.model_type!r} (it fuses {', '.join(sorted(set(MODEL_TYPES.values())))})")
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
        return model_type, int(heads or 0), int(hidden or 0), f"config.json's model_type {config.model_type!r}"
    if not ops.get("Softmax") or not (ops.get("LayerNormalization") or ops.get("ReduceMean")):
        raise NotApplicable("no attention (Softmax) and layer normalization in the graph: not a transformer, "
                            "so there is nothing for the transformer optimizer to fuse")
    return "bert", 0, 0, "the graph (Softmax and LayerNormalization: an encoder, fused as BERT)"


def fused(ctx: BuildContext) -> tuple[object, dict, list[str]]:
    """The export fused by the transformer optimizer (an onnxruntime OnnxModel), fused once per run:
    (model, options, notes)."""
    if "transformer_fused" in ctx.cache:
        cached = ctx.cache["transformer_fused"]
        if isinstance(cached, Exception):  # both recipes share one verdict: the fusion is not tried twice
            raise cached
        return cached
    try:
        ctx.cache["transformer_fused"] = _fuse(ctx)
    except Exception as error:
        ctx.cache["transformer_fused"] = error
        raise
    return ctx.cache["transformer_fused"]


def _fuse(ctx: BuildContext) -> tuple[object, dict, list[str]]:
    from onnxruntime.transformers.optimizer import optimize_model

    from optimizer.engines.ort import _quiet
    from optimizer.engines.runners import op_counts

    source = ort_source(ctx)
    ops = Counter(op_counts(source))
    model_type, heads, hidden, why = transformer_type(ctx, ops)
    try:
        with _quiet():  # its fusion passes log every pattern they try through the root logger
            # opt_level 0: the Python fusions only; ORT's own (hardware-specific) ones run when a session loads it
            model = optimize_model(str(source), model_type=model_type, num_heads=heads, hidden_size=hidden,
                                   opt_level=0)
    except Exception as error:
        raise _optimizer_failure(error, model_type) from error
    stats = {op: count for op, count in model.get_fused_operator_statistics().items() if count}
    if not stats:
        raise NotApplicable(f"the transformer optimizer ({model_type}) fused nothing in this graph: it would be "
                            "the same model as onnx-fp32")
    options = {"modelType": model_type, "numHeads": heads or "from the graph", "hiddenSize": hidden or "from the graph",
               "fused": stats}
    notes = [f"fused by ONNX Runtime's transformer optimizer as {model_type} ({why}): "
             + ", ".join(f"{count} {op}" for op, count in stats.items())]
    if ops.get("Softmax") and not any(stats.get(op) for op in FUSED_ATTENTION):
        notes.append(f"attention was not fused ({ops['Softmax']} Softmax left in MatMul/Softmax subgraphs): the "
                     "optimizer did not recognise this export's attention subgraph; its patterns follow the "
                     "TorchScript exporter's graphs (on a BERT here, `export.exporter: legacy` fused 4 of 4, the "
                     "dynamo export 0)")
    return model, options, notes


def _optimizer_failure(error: Exception, model_type: str) -> Exception:
    """The optimizer's own code failing on a graph its patterns do not expect is a reason (it says which
    graphs it knows); an error raised anywhere else stays an mlopt bug."""
    import traceback

    import onnxruntime.transformers

    frames = traceback.extract_tb(error.__traceback__)
    library = Path(onnxruntime.transformers.__file__).parent
    if not frames or not Path(frames[-1].filename).is_relative_to(library):
        return error
    frame = frames[-1]
    return RecipeFailure(
        f"ONNX Runtime's transformer optimizer ({model_type}) failed on this graph: {type(error).__name__} in "
        f"{Path(frame.filename).name}:{frame.lineno} ({frame.name}); its patterns follow the TorchScript exporter's "
        "graphs, so `export.exporter: legacy` may give it one it knows")


def _save(ctx: BuildContext, model, target: Path) -> Path:
    # all tensors in `<name>.onnx.data` beside it, as onnx_files.data_location names it
    model.save_model_to_file(str(target), use_external_data_format=ctx.external_data, all_tensors_to_one_file=True)
    return target


def ort_transformer_fp32(ctx: BuildContext, variant: VariantSpec) -> Built:
    model, options, notes = fused(ctx)
    target = _save(ctx, model, ctx.workdir / f"{variant.name}.onnx")
    return Built(_runner(ctx, variant.name, target), target, parent="export", options=dict(options), notes=list(notes))


def ort_transformer_int8_dynamic(ctx: BuildContext, variant: VariantSpec) -> Built:
    from optimizer.engines.runners import op_counts

    model, fused_options, notes = fused(ctx)
    source = _save(ctx, model, ctx.workdir / f"{variant.name}.fused.onnx")
    ops = variant.opTypes or ["MatMul", "Gemm", *FUSED_ATTENTION]
    target = ctx.workdir / f"{variant.name}.onnx"
    # ONNX's shape inference knows no contrib op (FastGelu, SkipLayerNormalization), so the tensors after one
    # have no type for the quantizer: they are all float32 here.
    _dynamic(ctx, source, target, ops, variant.excludeNodes, extra_options={"DefaultTensorType": 1})
    onnx_files.remove(source)
    counts = op_counts(target)
    integer = {op: n for op, n in counts.items() if op in ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention")}
    options = {"opTypes": ops, "weights": "int8", "reduceRange": ctx.hardware.reduce_range,
               "modelType": fused_options["modelType"], "fused": fused_options["fused"]}
    notes = [*notes, "INT8 ops: " + (", ".join(f"{n} {op}" for op, n in integer.items()) or "none"),
             "dynamic INT8 on the fused graph (static QDQ belongs before fusion: fused ops are not statically "
             "quantized, so ort-int8-static is the static recipe)"]
    return Built(_runner(ctx, variant.name, target), target, parent=Recipe.ort_transformer_fp32.value,
                 options=options, notes=notes)


def gemm_as_matmul(graph) -> int:
    """Gemm(A, W, bias) with a constant W (alpha = beta = 1, A not transposed) -> MatMul(A, W') + Add(bias), in place:
    MatMulNBitsQuantizer reads MatMul only. Returns how many were rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = initializers.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (weight is None or len(weight.dims) != 2 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0 or node.domain not in ("", "ai.onnx")):
            nodes.append(node)
            continue
        name = node.name or node.output[0]
        matmul_weight = node.input[1]
        if attrs.get("transB", 0):
            array = numpy_helper.to_array(weight)
            matmul_weight = f"{node.input[1]}/mlopt_transposed"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), matmul_weight))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{name}/mlopt_matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], matmul_weight], [product], name=f"{name}/MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{name}/Add"))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        used = {name for node in graph.node for name in node.input}
        kept = [init for init in graph.initializer if init.name in used]  # transposed weights replace their source
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return count


def weight_shares(graph) -> tuple[float, Counter]:
    """(share of the weights' elements that MatMul/Gemm/Gather read as weights, elements per consuming op type)."""
    import math

    sizes = {init.name: math.prod(init.dims) for init in graph.initializer}
    by_op: Counter = Counter()
    seen: set[str] = set()
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name in sizes and name not in seen and sizes[name] > 1:
                seen.add(name)
                weight_slot = (node.op_type in ("MatMul", "Gemm") and position == 1) or (
                    node.op_type == "Gather" and position == 0)
                # a MatMul/Gemm bias or a Gather's indices are not weights the quantizer packs
                by_op[node.op_type if weight_slot or node.op_type not in PACKED else "other"] += sizes[name]
    total = sum(by_op.values()) or 1
    return sum(by_op[op] for op in PACKED) / total, by_op


def ort_int4_weight_only(ctx: BuildContext, variant: VariantSpec) -> Built:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from optimizer.engines.ort import _quiet
    from optimizer.engines.runners import op_counts

    # the shapes alone decide (no weights read): a big CNN is skipped at once
    share, by_op = weight_shares(onnx.load(str(ort_source(ctx)), load_external_data=False).graph)
    if share < MATMUL_HEAVY:
        where = ", ".join(f"{op} {n / max(sum(by_op.values()), 1):.0%}" for op, n in by_op.most_common(3))
        raise NotApplicable(f"not MatMul-heavy: MatMul/Gemm/embedding weights are {share:.0%} of this model's weights "
                            f"(by consumer: {where}); 4-bit weight-only pays off where they dominate (transformers, MLPs)")
    # constants folded first: a tied lm_head reads the embeddings through a Transpose, which the quantizer skips
    source = basic_optimized(ctx, ctx.workdir / f"{variant.name}.basic.onnx")
    model = onnx.load(str(source))
    onnx_files.remove(source)
    share, _ = weight_shares(model.graph)  # with the folded constants
    rewritten = gemm_as_matmul(model.graph)
    ops = tuple(variant.opTypes or INT4_OP_TYPES)
    config = DefaultWeightOnlyQuantConfig(
        block_size=variant.blockSize, is_symmetric=variant.symmetric, accuracy_level=variant.accuracyLevel,
        op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
    with _quiet():
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=list(variant.excludeNodes), algo_config=config)
        quantizer.process()
    target = ctx.workdir / f"{variant.name}.onnx"
    quantizer.model.save_model_to_file(str(target), use_external_data_format=ctx.external_data)
    counts = op_counts(target)
    packed = counts.get("MatMulNBits", 0) + counts.get("GatherBlockQuantized", 0)
    if not packed:
        raise NotApplicable("the 4-bit quantizer found no MatMul or Gather with a constant 2-D weight to pack")
    options = {"bits": 4, "blockSize": variant.blockSize, "symmetric": variant.symmetric,
               "accuracyLevel": variant.accuracyLevel, "opTypes": list(ops), "algorithm": "RTN (round to nearest)"}
    level = {0: "unset (FP32 activations)", 1: "FP32 activations", 2: "FP16 activations", 3: "BF16 activations",
             4: "int8 activations inside the kernel"}[variant.accuracyLevel]
    notes = [f"{counts.get('MatMulNBits', 0)} MatMulNBits and {counts.get('GatherBlockQuantized', 0)} "
             f"GatherBlockQuantized: 4-bit weights in blocks of {variant.blockSize}, accuracy level "
             f"{variant.accuracyLevel} ({level}); {share:.0%} of the weights were MatMul/Gemm/embedding weights",
             "weight-only 4-bit saves memory and bandwidth; it is fastest where weights dominate the traffic "
             "(one token at a time); a long sequence in one forward is compute-bound, where INT8 may be faster"]
    if rewritten:
        notes.insert(1, f"{rewritten} Gemm node(s) written as MatMul + Add first: the 4-bit quantizer reads MatMul only")
    left = counts.get("MatMul", 0)
    if left:
        notes.append(f"{left} MatMul(s) stayed FP32 (activation × activation, as in attention, or excluded)")
    return Built(_runner(ctx, variant.name, target), target, parent="onnx-fp32", options=options, notes=notes)
