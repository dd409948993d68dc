"""Runners: one interface over PyTorch and ONNX Runtime, so every variant is timed the same way.

A runner maps a feed (input name -> numpy array) to a list of numpy outputs. `bind(feed)`
returns a zero-argument callable that runs one inference on pre-converted inputs: that is
what the benchmark times, so input conversion never counts as model time.
"""

from __future__ import annotations

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


def _as_numpy(outputs) -> list[np.ndarray]:
    import torch

    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    flat = []
    for item in outputs:
        if isinstance(item, (tuple, list)):
            flat.extend(_as_numpy(item))
        else:
            flat.append(item.detach().float().cpu().numpy() if item.is_floating_point() else item.cpu().numpy())
    return flat


@dataclass
class TorchRunner:
    module: object
    input_names: list[str]
    device: str = "cpu"
    runtime: str = "pytorch"

    @property
    def provider(self) -> str:
        return "CUDA" if self.device == "cuda" else "CPU"

    def _tensors(self, feed: Feed):
        import torch

        return [torch.from_numpy(np.ascontiguousarray(feed[name])).to(self.device) for name in self.input_names]

    def with_threads(self, count: int) -> "TorchRunner":
        return self  # PyTorch reads its thread count per call (torch_threads)

    def __call__(self, feed: Feed) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            return _as_numpy(self.module(*self._tensors(feed)))

    def bind(self, feed: Feed) -> Callable[[], object]:
        import torch

        tensors = self._tensors(feed)
        module = self.module

        def run_once():
            with torch.inference_mode():
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
class OrtRunner:
    path: Path
    threads: int = 1
    device: str = "cpu"
    optimized_path: Path | None = None  # where ORT writes its optimized graph (for op counts)
    runtime: str = "onnxruntime"
    session: object = field(init=False, repr=False)

    def __post_init__(self):
        import onnxruntime as ort

        options = session_options(self.threads)
        if self.optimized_path:
            options.optimized_model_filepath = str(self.optimized_path)
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]
        if self.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ProviderError(
                "benchmark.device is cuda, but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                "or use the GPU worker image"
            )
        if self.device == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* pip packages (see the GPU image)
        self.session = ort.InferenceSession(str(self.path), options, providers=wanted)
        bound = self.session.get_providers()[0]
        if bound != wanted[0]:
            # ORT falls back to CPU silently when CUDA fails to initialise: refuse to time that.
            raise ProviderError(f"asked for {wanted[0]}, but ONNX Runtime bound {bound}")

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
        return [np.asarray(o, dtype=np.float32) if np.asarray(o).dtype.kind == "f" else np.asarray(o)
                for o in self.session.run(None, {n: feed[n] for n in self.input_names})]

    def bind(self, feed: Feed) -> Callable[[], object]:
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
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if self.precision:
            config["INFERENCE_PRECISION_HINT"] = self.precision
        self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        self.request = self.compiled.create_infer_request()

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
