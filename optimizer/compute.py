"""How much arithmetic a model does, and what that implies for the fastest possible latency.

Multiply-accumulates are counted with forward hooks on the layers that dominate (Conv, Linear,
LSTM, GRU) at the declared input. The limit is MACs / (MACs per cycle × clock) on one core,
from the CPU's flags: an estimate, labelled as one in the report.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# Per core per cycle, for the common x86 cases (two FMA/dot-product pipes).
FP32_MACS_PER_CYCLE = {"avx512f": 16, "avx2": 16}  # Zen 4 double-pumps AVX-512: same as 2×AVX2 FMA
INT8_MACS_PER_CYCLE = {"amx_int8": 1024, "avx512_vnni": 64, "avx_vnni": 64, "avx2": 32}


def count_macs(module, feed: dict, input_names: list[str]) -> dict[str, int]:
    """MACs per layer type for one call on `feed`; empty if the module takes no hooks."""
    import torch

    counts: Counter = Counter()

    def conv(layer, inputs, output):
        kernel = layer.weight[0].numel()  # in_channels/groups × kernel area
        counts["Conv"] += output.numel() * kernel

    def linear(layer, inputs, output):
        counts["Linear"] += output.numel() * layer.in_features

    def recurrent(layer, inputs, output):
        gates = {"LSTM": 4, "GRU": 3}[type(layer).__name__]
        sequence = output[0]
        steps = sequence.shape[0] * sequence.shape[1]  # time × batch (either layout)
        directions = 2 if layer.bidirectional else 1
        per_step = 0
        for index in range(layer.num_layers):
            in_size = layer.input_size if index == 0 else layer.hidden_size * directions
            per_step += gates * layer.hidden_size * (in_size + layer.hidden_size) * directions
        counts[type(layer).__name__] += steps * per_step

    hooks_for = {torch.nn.Conv1d: conv, torch.nn.Conv2d: conv, torch.nn.Linear: linear,
                 torch.nn.LSTM: recurrent, torch.nn.GRU: recurrent}
    if not hasattr(module, "modules") or isinstance(module, torch.jit.ScriptModule):
        return {}
    handles = [m.register_forward_hook(hooks_for[type(m)]) for m in module.modules() if type(m) in hooks_for]
    try:
        with torch.inference_mode():
            module(*(torch.from_numpy(feed[name]) for name in input_names))
    finally:
        for handle in handles:
            handle.remove()
    return dict(counts)


def clock_ghz() -> float | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000.0
    except (OSError, ValueError):
        pass
    return None


def _rate(table: dict[str, int], flags: set[str]) -> int | None:
    return next((rate for flag, rate in table.items() if flag in flags), None)


def compute_limits(macs: int, flags: list[str], ghz: float | None) -> dict:
    """Lower bounds on one-core latency at the FP32 and INT8 peak rates (None when unknown)."""
    flag_set = set(flags)
    limits = {"macs": macs, "clockGHz": ghz, "fp32MacsPerCycle": _rate(FP32_MACS_PER_CYCLE, flag_set),
              "int8MacsPerCycle": _rate(INT8_MACS_PER_CYCLE, flag_set)}
    for key, rate in (("fp32LimitMs", limits["fp32MacsPerCycle"]), ("int8LimitMs", limits["int8MacsPerCycle"])):
        limits[key] = macs / (rate * ghz * 1e9) * 1000.0 if rate and ghz else None
    return limits
