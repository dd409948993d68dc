"""Runners: one interface over PyTorch and ONNX Runtime, so every variant is timed the same way.

A runner maps a feed (input name -> numpy array) to a list of numpy outputs. `bind(feed)`
returns a zero-argument callable that runs one inference on pre-converted inputs: that is
what the benchmark times, so input conversion never counts as model time.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from optimizer.api.errors import DeviceError

Feed = dict[str, np.ndarray]


class Runner(Protocol):
    """One engine's way to run a model: every variant is evaluated and timed through this."""

    runtime: str  # pytorch | onnxruntime | openvino

    @property
    def provider(self) -> str: ...

    def __call__(self, feed: Feed) -> list[np.ndarray]: ...

    def bind(self, feed: Feed) -> Callable[[], object]: ...

    def with_threads(self, count: int) -> "Runner": ...


class ProviderError(DeviceError):
    """The requested execution provider is not the one ONNX Runtime actually bound."""


def session_options(intra_threads: int, inter_threads: int = 1):
    """ONNX Runtime session options as every timed session here uses them: the given thread
    counts, sequential execution, all graph optimizations, warnings only."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = intra_threads, inter_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count inside the block, restored after it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_device(device: str) -> None:
    """Refuse a CUDA run up front when PyTorch sees no GPU: timing CPU work as GPU work is a lie."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(
            "benchmark.device is cuda, but PyTorch sees no CUDA device (torch.cuda.is_available() is False); "
            "run on a GPU node (the GPU worker image with an nvidia.com/gpu limit) or set benchmark.device: cpu"
        )


def flat_tensors(outputs) -> list:
    """A module's outputs (a tensor, or tuples/lists of them) as one flat list of tensors."""
    if isinstance(outputs, (tuple, list)):
        return [tensor for item in outputs for tensor in flat_tensors(item)]
    return [outputs]


def _as_numpy(outputs) -> list[np.ndarray]:
    return [item.detach().float().cpu().numpy() if item.is_floating_point() else item.cpu().numpy()
            for item in flat_tensors(outputs)]


@dataclass
class TorchRunner:
    """A PyTorch module on `device`. `dtype` casts the floating inputs (the recipe cast the weights);
    `autocast` runs every call under torch.autocast at that dtype instead. Outputs come back as FP32."""

    module: object
    input_names: list[str]
    device: str = "cpu"
    runtime: str = "pytorch"
    dtype: str | None = None  # float16 | bfloat16: floating inputs are cast to it
    autocast: str | None = None  # float16 | bfloat16: calls run under torch.autocast(device, dtype)

    @property
    def provider(self) -> str:
        return "CUDA" if self.device == "cuda" else "CPU"

    def tensors(self, feed: Feed):
        import torch

        tensors = [torch.from_numpy(np.ascontiguousarray(feed[name])).to(self.device) for name in self.input_names]
        if self.dtype:
            tensors = [t.to(getattr(torch, self.dtype)) if t.is_floating_point() else t for t in tensors]
        return tensors

    def context(self):
        """inference_mode, and autocast when asked for: the one place both are set."""
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast:
            stack.enter_context(torch.autocast(self.device, dtype=getattr(torch, self.autocast)))
        return stack

    def with_threads(self, count: int) -> "TorchRunner":
        return self  # PyTorch reads its thread count per call (torch_threads)

    def __call__(self, feed: Feed) -> list[np.ndarray]:
        # Inputs made outside inference_mode, as bind() makes them: torch.compile guards on the difference and
        # would compile a second time at the first timed run.
        tensors = self.tensors(feed)
        with self.context():
            return _as_numpy(self.module(*tensors))

    def bind(self, feed: Feed) -> Callable[[], object]:
        import torch

        tensors = self.tensors(feed)
        module = self.module

        def run_once():
            with self.context():
                result = module(*tensors)
            if self.device == "cuda":
                torch.cuda.synchronize()  # CUDA launches are async: time the work, not the launch
            return result

        return run_once


@dataclass
class CompiledTorchRunner(TorchRunner):
    """A torch.compile'd (inductor) module, e.g. a PT2E INT8 program.

    Inductor compiles on the first call at each new input shape, which takes seconds: bind() makes
    that call before it returns, so no timed run pays for compiling. Every compile runs under
    `inductor_config` (PT2E INT8 needs freezing on, or its weights are never prepacked into oneDNN's
    INT8 kernels), patched around untimed calls only. Inductor's own C++ kernels keep the thread
    count they were compiled with; oneDNN's INT8 kernels follow torch's thread count per call."""

    inductor_config: dict = field(default_factory=dict)
    runtime: str = "pytorch-inductor"
    compiled_shapes: set = field(default_factory=set, repr=False)

    def _shapes(self, feed: Feed) -> tuple:
        return tuple(tuple(np.shape(feed[name])) for name in self.input_names)

    def __call__(self, feed: Feed) -> list[np.ndarray]:
        import torch._inductor.config

        with torch._inductor.config.patch(self.inductor_config):
            outputs = super().__call__(feed)
        self.compiled_shapes.add(self._shapes(feed))
        return outputs

    def bind(self, feed: Feed) -> Callable[[], object]:
        if self._shapes(feed) not in self.compiled_shapes:
            self(feed)  # compile for this shape now, before anything is timed
        return super().bind(feed)


@dataclass
class CapturedGraph:
    """One CUDA graph of a module's forward at one set of input shapes: its static input and output
    tensors stay where the capture put them, so a replay reads and writes the same memory."""

    graph: object
    inputs: list
    outputs: object


def capture_cuda_graph(module, example: list, context: Callable[[], contextlib.AbstractContextManager],
                       warmup: int = 3) -> CapturedGraph:
    """Record `module(*example)` into a torch.cuda.CUDAGraph. The warm-up runs on a side stream first
    (as torch.cuda.graphs' docs ask), so cuDNN and cuBLAS pick their algorithms and workspaces before
    the capture, where they could not."""
    import torch

    inputs = [tensor.clone() for tensor in example]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), context():
        for _ in range(warmup):
            module(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with context(), torch.cuda.graph(graph):
        outputs = module(*inputs)
    return CapturedGraph(graph, inputs, outputs)


@dataclass
class CudaGraphRunner(TorchRunner):
    """A module replayed from CUDA graphs: one capture per input shape (static shapes only), then each
    inference is one graph launch instead of a launch per kernel. Inputs are copied into the captured
    graph's own input tensors; bind() copies once, so a timed run is the replay alone (as TorchRunner's
    timed run is the forward alone, on inputs already on the GPU)."""

    runtime: str = "pytorch-cudagraph"
    graphs: dict = field(default_factory=dict, repr=False)  # input shapes and dtypes -> CapturedGraph

    def _captured(self, tensors: list) -> CapturedGraph:
        key = tuple((tuple(t.shape), str(t.dtype)) for t in tensors)
        if key not in self.graphs:
            self.graphs[key] = capture_cuda_graph(self.module, tensors, self.context)
        captured = self.graphs[key]
        for static, tensor in zip(captured.inputs, tensors):
            static.copy_(tensor)
        return captured

    def __call__(self, feed: Feed) -> list[np.ndarray]:
        captured = self._captured(self.tensors(feed))
        captured.graph.replay()
        return _as_numpy(captured.outputs)  # copied to the host: the next replay overwrites them

    def bind(self, feed: Feed) -> Callable[[], object]:
        import torch

        graph = self._captured(self.tensors(feed)).graph

        def run_once():
            graph.replay()
            torch.cuda.synchronize()

        return run_once


# Ops that do a model's arithmetic. ONNX Runtime places small shape computations (Shape, Gather on
# shapes, ...) on the CPU on purpose, even with the CUDA provider first; one of these on the CPU means
# the GPU variant's time would partly be CPU time, so a CUDA session with one there is refused.
COMPUTE_OPS = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv",
    "MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "Gemm", "QGemm", "FusedGemm", "LSTM", "GRU", "RNN", "DynamicQuantizeLSTM",
    "Attention", "QAttention", "MultiHeadAttention", "GroupQueryAttention", "Einsum",
})


@dataclass(frozen=True)
class NodePlacement:
    node: str
    op: str
    provider: str


def placement_from_profile(events: list[dict]) -> list[NodePlacement]:
    """Where each node ran, from ONNX Runtime's profile (its per-node kernel events name the provider)."""
    seen: dict[str, NodePlacement] = {}
    for event in events:
        name, args = event.get("name", ""), event.get("args", {})
        if event.get("cat") == "Node" and name.endswith("_kernel_time") and "provider" in args:
            node = name.removesuffix("_kernel_time")
            seen.setdefault(node, NodePlacement(node, args.get("op_name", "?"), args["provider"]))
    return list(seen.values())


def check_placement(placement: list[NodePlacement], wanted: str) -> str:
    """A one-line account of where the nodes ran; ProviderError when a compute op ran on another provider
    than `wanted`, or when nothing at all ran on it."""
    if not placement:
        raise ProviderError(f"ONNX Runtime's profile shows no node at all, so it cannot show that {wanted} ran the model")
    elsewhere = [p for p in placement if p.provider != wanted]
    compute = [p for p in elsewhere if p.op in COMPUTE_OPS]
    on_wanted = len(placement) - len(elsewhere)
    if compute or not on_wanted:
        ops = Counter(p.op for p in (compute or elsewhere))
        listed = ", ".join(f"{op} ×{n}" for op, n in ops.most_common())
        where = ", ".join(sorted({p.provider for p in compute or elsewhere}))
        raise ProviderError(
            f"{wanted} was asked for, but ONNX Runtime ran {len(compute or elsewhere)} of {len(placement)} nodes "
            f"on {where} ({listed}; e.g. {(compute or elsewhere)[0].node}): they have no {wanted} kernel here, "
            "so this variant's time would be CPU time; it is not timed. Use a variant whose ops the GPU runs "
            "(onnx-fp32, onnx-fp16) or a PyTorch GPU recipe"
        )
    note = f"{on_wanted} of {len(placement)} nodes ran on {wanted} (checked with ONNX Runtime's profiler)"
    if elsewhere:
        ops = Counter(p.op for p in elsewhere)
        note += ("; on " + ", ".join(sorted({p.provider for p in elsewhere})) + ": "
                 + ", ".join(f"{op} ×{n}" for op, n in ops.most_common()) + " (no compute ops: ONNX Runtime keeps "
                 "small shape computations there on purpose)")
    return note


@dataclass
class OrtRunner:
    path: Path
    threads: int = 1
    device: str = "cpu"
    optimized_path: Path | None = None  # where ORT writes its optimized graph (for op counts)
    runtime: str = "onnxruntime"
    session: object = field(init=False, repr=False)
    placement_note: str | None = field(default=None, init=False)  # CUDA: where the nodes ran, once checked

    def __post_init__(self):
        options = session_options(self.threads)
        if self.optimized_path:
            options.optimized_model_filepath = str(self.optimized_path)
        self.session = self._session(options)

    @property
    def _providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]

    def _session(self, options):
        """A session on the asked-for provider, or ProviderError: ORT falls back to the CPU silently when
        the CUDA provider is missing or fails to initialise, and that must never be timed as the GPU."""
        import onnxruntime as ort

        wanted = self._providers
        if self.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ProviderError(
                "benchmark.device is cuda, but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(ort.get_available_providers())}; onnxruntime {ort.__version__}); "
                "install onnxruntime-gpu or use the GPU worker image"
            )
        if self.device == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* pip packages (see the GPU image)
        session = ort.InferenceSession(str(self.path), options, providers=wanted)
        bound = session.get_providers()[0]
        if bound != wanted[0]:
            raise ProviderError(f"asked for {wanted[0]}, but ONNX Runtime bound {bound}")
        return session

    def placement(self, feed: Feed) -> list[NodePlacement]:
        """Where each node runs: one run of `feed` in a second, profiled session on the same providers."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mlopt-placement-") as folder:
            options = session_options(self.threads)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(folder) / "placement")
            session = self._session(options)
            session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})
            return placement_from_profile(json.loads(Path(session.end_profiling()).read_text()))

    def verify_placement(self, feed: Feed) -> str:
        """That every compute node runs on the asked-for provider (check_placement), with a note saying where
        the nodes ran; ProviderError otherwise. Done before a CUDA session's first result is used or timed."""
        self.placement_note = check_placement(self.placement(feed), self._providers[0])
        return self.placement_note

    def _verified(self, feed: Feed) -> None:
        if self.device == "cuda" and self.placement_note is None:
            self.verify_placement(feed)  # before the first result is used or timed

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def with_threads(self, count: int) -> "OrtRunner":
        return OrtRunner(self.path, threads=count, device=self.device)

    def __call__(self, feed: Feed) -> list[np.ndarray]:
        self._verified(feed)
        return [np.asarray(o, dtype=np.float32) if np.asarray(o).dtype.kind == "f" else np.asarray(o)
                for o in self.session.run(None, {n: feed[n] for n in self.input_names})]

    def bind(self, feed: Feed) -> Callable[[], object]:
        self._verified(feed)
        if self.device != "cuda":
            session, inputs = self.session, {n: feed[n] for n in self.input_names}
            return lambda: session.run(None, inputs)
        binding = self.session.io_binding()
        for name in self.input_names:
            binding.bind_cpu_input(name, feed[name])
        for name in self.output_names:
            binding.bind_output(name, "cuda")

        def run_once():
            binding.synchronize_inputs()
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return run_once


@dataclass
class OpenVinoRunner:
    """An OpenVINO IR (model.xml + model.bin) compiled for the CPU plugin, one inference request.

    precision: "f32" pins FP32 arithmetic; None leaves OpenVINO its default (bf16 on CPUs with
    AMX or AVX-512 BF16, f32 elsewhere). `provider` says which it really used."""

    path: Path
    threads: int = 1
    precision: str | None = "f32"
    device: str = "cpu"
    runtime: str = "openvino"
    compiled: object = field(init=False, repr=False)

    def __post_init__(self):
        self.compiled = self._compile()
        self.request = self.compiled.create_infer_request()

    def _compile(self, **extra):
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", **extra}
        if self.precision:
            config["INFERENCE_PRECISION_HINT"] = self.precision
        return ov.Core().compile_model(str(self.path), "CPU", config)

    def compile_profiled(self):
        """The same model compiled the same way, with OpenVINO's per-node performance counters on
        (PERF_COUNT): a request's `profiling_info` then gives each executed node's time and kernel."""
        return self._compile(PERF_COUNT=True)

    @property
    def provider(self) -> str:
        precision = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: f32, bf16, f16
        return f"CPU ({precision.get_type_name() if hasattr(precision, 'get_type_name') else precision})"

    @property
    def input_names(self) -> list[str]:
        return [port.get_any_name() for port in self.compiled.inputs]

    @property
    def output_names(self) -> list[str]:
        return [port.get_any_name() for port in self.compiled.outputs]

    def with_threads(self, count: int) -> "OpenVinoRunner":
        return OpenVinoRunner(self.path, threads=count, precision=self.precision)

    def __call__(self, feed: Feed) -> list[np.ndarray]:
        result = self.request.infer({name: feed[name] for name in self.input_names})
        return [np.array(result[port], dtype=np.float32) if result[port].dtype.kind == "f" else np.array(result[port])
                for port in self.compiled.outputs]

    def bind(self, feed: Feed) -> Callable[[], object]:
        request, inputs = self.request, {name: feed[name] for name in self.input_names}
        return lambda: request.infer(inputs)


def op_counts(onnx_path: Path) -> dict[str, int]:
    """Op types in an ONNX graph (after ORT optimization when given the optimized file)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    counts = Counter(node.op_type for node in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
