"""How much arithmetic a model does, and the physical limit it implies on this machine.

Multiply-accumulates are counted with forward hooks on the layers that dominate (Conv, Linear,
LSTM, GRU) at the declared input, as the matrix products they are. The physical limit is those
MACs at the most the instruction set can do per cycle and core (PHYSICAL_MACS_PER_CYCLE, sources
in docs/limits.md) × the clock measured while the kernels ran (optimizer/measure/clock.py) × the
benchmark's threads: no kernel on this CPU can run faster. The measured limits (the kernels' peak,
and the kernels at the model's shapes) are in optimizer/measure/limits.py; per layer type, the
op-time profile of the best variant then says how close each gets to them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from optimizer.measure.kernels import INT8_OPS, RUNS_AS


@dataclass(frozen=True)
class Product:
    """`count` matrix products of (m × k) by (k × n) that one layer type does per inference."""

    layer: str
    m: int
    k: int
    n: int
    count: int = 1

    @property
    def macs(self) -> int:
        return self.m * self.k * self.n * self.count


def count_products(module, feed: dict, input_names: list[str]) -> list[Product]:
    """The matrix products of one call on `feed`; empty if the module takes no hooks."""
    import torch

    products: list[Product] = []

    def conv(layer, inputs, output):
        groups = layer.groups
        channels = output.shape[output.dim() - len(layer.kernel_size) - 1]
        positions = output.numel() // channels  # batch × output pixels
        kernel = layer.weight[0].numel()  # in_channels/groups × kernel area
        products.append(Product("Conv", positions, kernel, layer.out_channels // groups, groups))

    def linear(layer, inputs, output):
        products.append(Product("Linear", output.numel() // layer.out_features, layer.in_features, layer.out_features))

    def recurrent(layer, inputs, output):
        kind = type(layer).__name__
        gates = {"LSTM": 4, "GRU": 3}[kind]
        sequence = output[0]
        batch, steps = (sequence.shape[0], sequence.shape[1]) if layer.batch_first else (sequence.shape[1], sequence.shape[0])
        directions = 2 if layer.bidirectional else 1
        hidden = layer.hidden_size
        for index in range(layer.num_layers):
            in_size = layer.input_size if index == 0 else hidden * directions
            products.append(Product(kind, steps * batch, in_size, gates * hidden, directions))  # input, all steps at once
            products.append(Product(kind, batch, hidden, gates * hidden, steps * directions))  # recurrence, step by step

    def attention(layer, inputs, output):
        # Counted as Linear: ONNX Runtime runs all of it as MatMul/Gemm. Its out_proj is applied with
        # F.linear, never called as a module, so it is not counted twice.
        query, key = inputs[0], inputs[1]
        batched = query.dim() == 3
        length, source = (query.shape[-2], key.shape[-2]) if layer.batch_first or not batched else (query.shape[0], key.shape[0])
        batch = (query.shape[0] if layer.batch_first else query.shape[1]) if batched else 1
        embed, heads = layer.embed_dim, layer.num_heads
        head = embed // heads
        products.extend([
            Product("Linear", batch * length, embed, embed),  # query projection
            Product("Linear", batch * source, layer.kdim, embed), Product("Linear", batch * source, layer.vdim, embed),
            Product("Linear", length, head, source, batch * heads),  # scores: Q·Kᵀ per head
            Product("Linear", length, source, head, batch * heads),  # scores · V per head
            Product("Linear", batch * length, embed, embed),  # output projection
        ])

    hooks_for = {torch.nn.Conv1d: conv, torch.nn.Conv2d: conv, torch.nn.Linear: linear,
                 torch.nn.LSTM: recurrent, torch.nn.GRU: recurrent, torch.nn.MultiheadAttention: attention}
    if not hasattr(module, "modules") or isinstance(module, torch.jit.ScriptModule):
        return []
    handles = [m.register_forward_hook(hooks_for[type(m)]) for m in module.modules() if type(m) in hooks_for]
    # The encoder layers' fused inference path calls no submodule, so no hook would see them.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode():
            module(*(torch.from_numpy(feed[name]) for name in input_names))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for handle in handles:
            handle.remove()
    return products


def macs_by_type(products: list[Product]) -> dict[str, int]:
    counts: Counter = Counter()
    for product in products:
        counts[product.layer] += product.macs
    return dict(counts)


# Per core and cycle, by ISA class (optimizer.measure.hardware.isa_class): (FP32, INT8) multiply-
# accumulates at the instruction set's best, two vector pipes that multiply. docs/limits.md has the
# derivation and sources. Where a core has less (Zen 4 runs a 512-bit op as two 256-bit halves),
# the line is looser, never beaten.
PHYSICAL_MACS_PER_CYCLE = {
    "avx2": (16, 32),  # 2 × vfmadd231ps ymm (8 lanes); vpmaddubsw + vpmaddwd ymm: 32 u8×s8 products per 2 uops
    "avx512": (32, 64),  # 2 × vfmadd231ps zmm (16 lanes); the same pair on zmm: 64 products per 2 uops
    "avx-vnni": (16, 64),  # vpdpbusd ymm: 32 products in one instruction, 2 per cycle
    "avx512-vnni": (32, 128),  # vpdpbusd zmm: 64 products in one instruction, 2 per cycle
    "amx": (32, 1024),  # tdpbusd: 16×16×64 = 16384 products per tile instruction, one per 16 cycles
}


def physical_limits(macs: int, isa: str, ghz: float | None, threads: int) -> dict:
    """Milliseconds for `macs` at the ISA's per-cycle MACs × `ghz` × `threads` cores, per precision
    (None without a clock or for an ISA class outside the table)."""
    fp32, int8 = PHYSICAL_MACS_PER_CYCLE.get(isa, (None, None))
    limits = {"isa": isa, "clockGHz": ghz, "threads": threads, "fp32MacsPerCycle": fp32, "int8MacsPerCycle": int8}
    for precision, per_cycle in (("fp32", fp32), ("int8", int8)):
        rate = per_cycle * ghz * 1e9 * threads if per_cycle and ghz else None
        limits[f"{precision}MacsPerS"] = rate
        limits[f"{precision}LimitMs"] = macs / rate * 1000.0 if rate else None
    return limits


def layer_efficiency(by_type: dict[str, int], profile: list[dict], peaks: dict, at_shapes: dict | None = None,
                     precision: str | None = None) -> list[dict]:
    """Per counted layer type: the op types that ran it, their time in the profile, and the MAC rate
    against the kernels' peak and against the kernels at its own shapes, both of `precision` (the
    best variant's; by default the layer's own: INT8 when any of its ops is INT8)."""
    rows = []
    for layer, macs in sorted(by_type.items(), key=lambda kv: -kv[1]):
        ops = [row for row in profile if row["op"] in RUNS_AS.get(layer, ())]
        ms = sum(row["ms"] for row in ops)
        if not ops or ms <= 0:
            continue
        int8 = [row["op"] in INT8_OPS for row in ops]
        ran_in = "int8" if all(int8) else "mixed" if any(int8) else "fp32"
        against = precision or ("fp32" if ran_in == "fp32" else "int8")
        rate = macs / (ms / 1000.0)
        row = {"layer": layer, "macs": macs, "ranAs": [row["op"] for row in ops], "precision": ran_in,
               "limitPrecision": against, "ms": ms, "macsPerS": rate,
               "fractionOfPeak": rate / peaks[f"{against}MacsPerS"]}
        limit = (at_shapes or {}).get("byType", {}).get(layer, {}).get(f"{against}Ms")
        if limit is not None:
            row["shapeLimitMs"] = limit
            row["fractionOfShapeLimit"] = limit / ms
        rows.append(row)
    return rows
