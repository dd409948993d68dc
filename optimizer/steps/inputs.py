"""The inputs step: spec.model.inputs against what the model itself declares, before any work.

A spec that does not fit its model used to fail minutes later, deep in a recipe, with a
runtime's traceback. Here it fails at once with the field to change and how:
- ONNX: graph inputs (names, element types, ranks, fixed dims, symbolic dims);
- torch.export programs: the user inputs' shapes (fixed ints or symbols) and symbol ranges;
- every PyTorch format (eager, TorchScript, exported program): a trial forward pass at the
  declared shapes and, when axes are declared dynamic, at the second parity shape.

Decision: a spec with no dynamicAxes is checked (and later verified and timed) at its declared
shape only; the results say so. A fixed-batch artifact is fine as long as the spec does not
promise a dynamic batch.
"""

from __future__ import annotations

from optimizer.api.errors import InputMismatchError
from optimizer.engines.feeds import random_feed
from optimizer.steps.export import parity_shapes
from optimizer.api.spec import DType, InputSpec
from optimizer.steps.run import Run

_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 11: "float64", 9: "bool", 2: "uint8", 3: "int8"}
_TORCH_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.int64": "int64", "torch.int32": "int32"}


def _field(index: int, name: str, rest: str = "") -> str:
    return f"spec.model.inputs[{index}] ({name}){rest}"


def _describe(inputs: list[tuple[str, str, list]]) -> str:
    return ", ".join(f"{name} {dtype} {dims}" for name, dtype, dims in inputs)


def _check_dims(index: int, spec: InputSpec, dims: list, kind: str, shown: str) -> None:
    """dims: int for a fixed size, anything else (a name, a symbol) for a dynamic one."""
    if len(dims) != len(spec.shape):
        raise InputMismatchError(
            f"{_field(index, spec.name, '.shape')}: {spec.shape} has {len(spec.shape)} axes, but the {kind} "
            f"expects {len(dims)} ({shown}); use a shape of the model's rank")
    for axis, (want, have) in enumerate(zip(spec.shape, dims)):
        if not isinstance(have, int) or have <= 0:
            continue
        if axis in spec.dynamicAxes:
            raise InputMismatchError(
                f"{_field(index, spec.name, '.dynamicAxes')}: axis {axis} ({spec.dynamicAxes[axis]}) is declared "
                f"dynamic, but the {kind} fixes it at {have} ({shown}); drop axis {axis} from dynamicAxes, or "
                "re-export the model with that axis dynamic (torch.export Dim / torch.onnx dynamic_shapes)")
        if want != have:
            raise InputMismatchError(
                f"{_field(index, spec.name, f'.shape[{axis}]')}: is {want}, but the {kind} expects {have} "
                f"({shown}); use the shape the model expects")


def check_onnx(path, inputs: list[InputSpec]) -> None:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {tensor.name for tensor in graph.initializer}
    declared = []
    for value in graph.input:
        if value.name in initializers:
            continue  # old exports list weights as inputs too
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
        declared.append((value.name, _ONNX_DTYPES.get(tensor.elem_type, f"type {tensor.elem_type}"), dims))
    by_name = {name: (dtype, dims) for name, dtype, dims in declared}
    shown = _describe(declared)
    for index, spec in enumerate(inputs):
        if spec.name not in by_name:
            raise InputMismatchError(
                f"{_field(index, spec.name, '.name')}: the ONNX model has no input {spec.name!r}; its inputs are "
                f"{shown}; use those names")
        dtype, dims = by_name[spec.name]
        if dtype != spec.dtype:
            supported = [d.value for d in DType]
            fix = (f"set dtype: {dtype}" if dtype in supported else
                   f"mlopt feeds {', '.join(supported)} only: re-export the model with a {' or '.join(supported[:2])} "
                   "input (cast inside the model)")
            raise InputMismatchError(
                f"{_field(index, spec.name, '.dtype')}: is {spec.dtype}, but the ONNX model expects {dtype}; {fix}")
        _check_dims(index, spec, dims, "ONNX model", shown)
    missing = [name for name, _, _ in declared if name not in {s.name for s in inputs}]
    if missing:
        raise InputMismatchError(
            f"spec.model.inputs: the ONNX model also needs {', '.join(missing)} ({shown}); add an entry for each")


def check_exported_program(program, inputs: list[InputSpec]) -> None:
    """The user inputs of a torch.export program: fixed dims are ints, dynamic ones symbols."""
    names = list(program.graph_signature.user_inputs)
    values = {node.name: node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder"}
    declared = []
    for name in names:
        value = values.get(name)
        shape = getattr(value, "shape", None)
        dims = [] if shape is None else [int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in shape]
        declared.append((name, _TORCH_DTYPES.get(str(getattr(value, "dtype", "")), str(getattr(value, "dtype", "?"))), dims))
    shown = _describe(declared)
    if len(declared) != len(inputs):
        raise InputMismatchError(
            f"spec.model.inputs: lists {len(inputs)} input(s), but the exported program takes {len(declared)} "
            f"({shown}); give one entry per input, in order")
    ranges = {str(symbol): value for symbol, value in program.range_constraints.items()}
    for index, (spec, (_, _, dims)) in enumerate(zip(inputs, declared)):
        _check_dims(index, spec, dims, "exported program", shown)
        for axis, dim in enumerate(dims):
            bounds = ranges.get(str(dim))
            if bounds is None:
                continue
            low, high = _bound(bounds.lower), _bound(bounds.upper)
            for size in {spec.shape[axis], spec.shape[axis] * 2 if axis in spec.dynamicAxes else spec.shape[axis]}:
                if not low <= size <= high:
                    raise InputMismatchError(
                        f"{_field(index, spec.name, f'.shape[{axis}]')}: size {size} is outside the range "
                        f"{low}..{high} that the exported program allows for axis {axis} ({shown}); use a size "
                        "inside it, or re-export with a wider Dim")


def _bound(value) -> float:
    try:
        return float(value)  # sympy's int_oo becomes inf
    except (TypeError, ValueError):
        return float("inf")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def trial_forward(module, inputs: list[InputSpec]) -> None:
    """Run the model once per parity shape; turn the layer's complaint into a spec message."""
    from optimizer.engines.runners import TorchRunner

    runner = TorchRunner(module, [spec.name for spec in inputs])
    for position, shapes in enumerate(parity_shapes(inputs)):
        shown = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        try:
            runner(random_feed(inputs, shapes))
        except Exception as error:  # a layer's own check: Conv channels, Linear features, guards
            if position == 0:
                raise InputMismatchError(
                    f"spec.model.inputs: the model rejects inputs of the declared shape ({shown}): "
                    f"{_first_line(error)}; use the shape the model expects") from None
            axes = "; ".join(f"{s.name} axes {sorted(s.dynamicAxes)}" for s in inputs if s.dynamicAxes)
            raise InputMismatchError(
                f"spec.model.inputs[].dynamicAxes: the model runs at the declared shape but fails when the dynamic "
                f"axes change size ({axes}; tried {shown}): {_first_line(error)}; drop those axes from dynamicAxes, "
                "or give a model exported with them dynamic") from None


def check_inputs(loaded) -> list[str]:
    """Raise InputMismatchError when spec.model.inputs cannot fit the model; return notes."""
    inputs = loaded.inputs
    if loaded.onnx_path is not None:
        check_onnx(loaded.onnx_path, inputs)
    else:
        if loaded.program is not None:
            check_exported_program(loaded.program, inputs)
        trial_forward(loaded.module, inputs)
    if not any(spec.dynamicAxes for spec in inputs):
        return ["no dynamicAxes declared: the model is verified and timed at the declared shape only"]
    return []


def inputs_step(run: Run) -> None:
    """spec.model.inputs against the model itself, before any work (exits 2 on a mismatch)."""
    run.input_notes = check_inputs(run.loaded)
