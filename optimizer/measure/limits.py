"""The limits the report prints, measured together, right after the benchmark, until stable.

- at the model's shapes: per layer type, the fastest of the ONNX Runtime variants' own compute
  kernels of one precision, each run alone at the shapes and with the prepacked weights it has in
  the variant (kernels.py). A variant runs its kernels and more, so this is below every ONNX
  Runtime variant of that precision (a layer type one variant does not run as such counts 0).
- at the model's shapes, OpenVINO's kernels (when the best variant runs on OpenVINO): its own
  compiled model's compute nodes, timed by OpenVINO's performance counters inside profiled
  inferences of it, each node's mean over the rounds (all the counters keep) summed
  (openvino_kernels.py): below that variant's mean.
- the kernels' peak: the MACs at the fastest rate ONNX Runtime's kernels of one precision reached
  here, on a large GEMM with constant weights or on any layer type at its own shapes, whichever is
  faster; so it is at or below the line above.
- physical: the MACs at the instruction set's per-cycle rate × the clock measured by a dependent-
  add chain in the same rounds × the threads (compute.physical_limits): below every variant of any
  runtime.
All of them are timed in the same interleaved rounds (with the best variant, for a same-moment
check) until their fastest times settle (fastest.py). A limit the best variant's benchmark mean
beats was measured at a disturbed moment: it is measured once more and the fastest times of both
attempts kept; if it is still beaten, the record says so and no fraction is given for it.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from optimizer.measure import clock
from optimizer.measure.compute import physical_limits
from optimizer.measure.fastest import PATIENCE, TOLERANCE, Fastest, fastest_until_stable
from optimizer.measure.kernels import (GEMM_SHAPE, KernelGraph, empty_run, gemm_macs, kernel_graphs, peak_gemms,
                                      precision_of)
from optimizer.measure.openvino_kernels import OpenVinoKernels, exec_types

DROP_SLOWER = 1.25  # a variant's kernels this much slower than another's for the same layer type stop being timed
PRECISIONS = ("fp32", "int8")
CLOCK = ("clock",)
OVERHEAD = ("overhead",)  # one session.run of a graph that does nothing: subtracted from every kernel graph's time
BEST = ("best",)
OPENVINO = ("openvino",)  # a burst of profiled inferences of the best variant's OpenVINO model; its parts are its nodes
LINES = ("atShapes", "peak", "physical")


@dataclass(frozen=True)
class Candidate:
    """An ONNX Runtime variant whose kernels are timed: its name and the graph ORT optimized for it."""

    name: str
    optimized: Path


@dataclass(frozen=True)
class Best:
    """The best variant: its name, precision, whether it runs on ONNX Runtime (the at-shape and peak
    lines are ONNX Runtime's kernels), its benchmark mean, and one bound inference."""

    name: str
    precision: str
    onnxruntime: bool
    mean_ms: float
    call: Callable[[], object] | None = None


class _Plan:
    """The calls of one measurement and how their fastest times make the limits."""

    def __init__(self, graphs: list[KernelGraph], best: Best | None, threads: int,
                 openvino: OpenVinoKernels | None = None):
        self.graphs = {("kernels", g.variant, g.layer): g for g in graphs}
        ops: dict[str, list[str]] = {}
        for graph in graphs:
            ops.setdefault(graph.variant, []).extend(graph.ops)
        self.ops = ops
        self.precision = {variant: precision_of(variant_ops) for variant, variant_ops in ops.items()}
        if best and best.name in self.precision:  # its own kernels say it better than its recipe's name
            best = replace(best, precision=self.precision[best.name])
        self.best = best
        self.calls: dict = {key: graph.run for key, graph in self.graphs.items()}
        self.calls.update({("gemm", precision): call for precision, call in peak_gemms(threads).items()})
        self.calls[OVERHEAD] = empty_run(threads)
        chain = clock.chain_call()
        if chain:
            self.calls[CLOCK] = chain
        if best and best.call:
            self.calls[BEST] = best.call
        self.openvino = openvino
        if openvino:
            self.calls[OPENVINO] = openvino.run

    def openvino_nodes(self, times: dict) -> dict[str, float]:
        """Each of the OpenVINO model's compute nodes timed in `times`: node -> seconds."""
        return {node: times[(OPENVINO, node)] for node in self.openvino.layer_of if (OPENVINO, node) in times}

    @staticmethod
    def net(times: dict, key) -> float:
        """A graph's time less the cost of one session.run: a variant pays that once per inference,
        its kernels timed one graph per layer type would pay it once per layer type."""
        return max(0.0, times[key] - times.get(OVERHEAD, 0.0))

    def layers(self, precision: str) -> list[str]:
        return sorted({layer for (_, variant, layer) in self.graphs if self.precision[variant] == precision})

    def variants(self, precision: str) -> list[str]:
        return [variant for variant, p in self.precision.items() if p == precision]

    def per_layer(self, times: dict) -> dict[tuple[str, str], tuple[float, str | None]]:
        """(precision, layer) → (fastest seconds over that precision's variants, which variant). A
        variant that has no node of the layer type counts 0 (it does that work some other way);
        a call missing from `times` (no longer timed) does not count."""
        out = {}
        for precision in PRECISIONS:
            for layer in self.layers(precision):
                options = []
                for variant in self.variants(precision):
                    key = ("kernels", variant, layer)
                    if key not in self.graphs:
                        options.append((0.0, variant))
                    elif key in times:
                        options.append((self.net(times, key), variant))
                if options:
                    out[(precision, layer)] = min(options)
        return out

    def totals(self, times: dict) -> dict[str, float]:
        per_layer = self.per_layer(times)
        out = {f"atShapes.{p}": sum(s for (q, _), (s, _) in per_layer.items() if q == p)
               for p in PRECISIONS if self.variants(p)}
        out.update({f"gemm.{p}": self.net(times, ("gemm", p)) for p in PRECISIONS if ("gemm", p) in times})
        if CLOCK in times:
            out["clock"] = times[CLOCK]
        if self.openvino and self.openvino_nodes(times):
            out["openvino"] = sum(self.openvino_nodes(times).values())
        return out

    def drop(self, fastest: dict) -> set:
        per_layer = self.per_layer(fastest)
        keep = self.best.name if self.best else None
        return {key for key in self.graphs if key[1] != keep
                and self.net(fastest, key) > DROP_SLOWER * per_layer[(self.precision[key[1]], key[2])][0]}


def _merge(first: Fastest, second: Fastest) -> Fastest:
    """Two attempts as one: the fastest time of each call over both, every round of both."""
    never = float("inf")
    return Fastest(fastest={key: min(first.fastest.get(key, never), second.fastest.get(key, never))
                            for key in {**first.fastest, **second.fastest}},
                   samples={key: first.samples.get(key, [None] * first.rounds) + second.samples.get(key, [None] * second.rounds)
                            for key in {**first.samples, **second.samples}},
                   totals_of=first.totals_of, shared=first.shared,
                   totals={name: first.totals[name] + second.totals[name] for name in first.totals},
                   rounds=first.rounds + second.rounds, seconds=first.seconds + second.seconds, stable=second.stable)


def _at_shapes(plan: _Plan, measured: Fastest, threads: int) -> dict:
    per_layer = plan.per_layer(measured.fastest)
    by_type: dict[str, dict] = {}
    for (precision, layer), (seconds, variant) in per_layer.items():
        by_type.setdefault(layer, {})[f"{precision}Ms"] = seconds * 1000.0
        by_type[layer][f"{precision}From"] = variant
    record = {"threads": threads, "byType": by_type, "variants": {},
              "runOverheadMs": measured.fastest[OVERHEAD] * 1000.0}
    for precision in PRECISIONS:
        if plan.variants(precision):
            record[f"{precision}LimitMs"] = sum(seconds for (p, _), (seconds, _) in per_layer.items() if p == precision) * 1000.0
            record[f"{precision}SpreadMs"] = [value * 1000.0 for value in measured.spread(f"atShapes.{precision}")]
            record[f"{precision}MedianRoundMs"] = measured.median(f"atShapes.{precision}") * 1000.0
    for variant, ops in plan.ops.items():
        kernels = [key for key in plan.graphs if key[1] == variant]
        record["variants"][variant] = {
            "precision": plan.precision[variant],
            "kernels": dict(sorted(Counter(ops).items(), key=lambda kv: (-kv[1], kv[0]))),
            "kernelsMs": sum(plan.net(measured.fastest, key) for key in kernels) * 1000.0,
        }
    return record


def _openvino(plan: _Plan, measured: Fastest, threads: int) -> dict:
    """The best variant's OpenVINO compute nodes, each at its lowest mean over the rounds, per node
    type, what ran them, and the profiled inference's own time per inference (fastest burst, mean)."""
    kernels, by_type = plan.openvino, {}
    walls = [seconds for seconds in measured.samples[OPENVINO] if seconds is not None]
    for node, seconds in plan.openvino_nodes(measured.fastest).items():
        row = by_type.setdefault(kernels.layer_of[node], {"ms": 0.0, "nodes": 0, "execTypes": Counter()})
        row["ms"] += seconds * 1000.0
        row["nodes"] += 1
        row["execTypes"][kernels.exec_type[node]] += 1
    for row in by_type.values():
        row["execTypes"] = dict(row["execTypes"].most_common())
    return {"variant": kernels.variant, "kernels": "OpenVINO's", "precision": kernels.precision, "threads": threads,
            "limitMs": sum(row["ms"] for row in by_type.values()), "byType": by_type, "execTypes": exec_types(kernels),
            "spreadMs": [value * 1000.0 for value in measured.spread("openvino")] if by_type else None,
            "medianRoundMs": measured.median("openvino") * 1000.0 if by_type else None,
            "burst": kernels.burst, "profiledFastestMs": measured.fastest[OPENVINO] / kernels.burst * 1000.0,
            "profiledMeanMs": statistics.mean(walls) / kernels.burst * 1000.0}


def _peak(plan: _Plan, measured: Fastest, macs: int, by_type: dict[str, int], at_shapes: dict, threads: int) -> dict:
    m, k, n = GEMM_SHAPE
    record = {"gemm": f"{m}x{k}x{n}", "threads": threads}
    for precision in PRECISIONS:
        gemm_rate = gemm_macs() / plan.net(measured.fastest, ("gemm", precision))
        rates = [(gemm_rate, f"the {m}x{k}x{n} GEMM")]
        for layer, limits in at_shapes["byType"].items():
            seconds = (limits.get(f"{precision}Ms") or 0.0) / 1000.0
            if seconds > 0 and by_type.get(layer):
                rates.append((by_type[layer] / seconds, f"{layer} at its shapes"))
        rate, source = max(rates)
        at_shapes_ms = at_shapes.get(f"{precision}LimitMs")
        if at_shapes_ms is not None and macs / rate * 1000.0 > at_shapes_ms:
            # A layer type the MAC count has and no kernel ran as, or kernels below one run's cost:
            # the kernels at the model's shapes are then the fastest rate seen.
            rate, source = (macs / (at_shapes_ms / 1000.0) if at_shapes_ms else float("inf")), "the kernels at the model's shapes"
        record.update({f"{precision}GemmMacsPerS": gemm_rate, f"{precision}MacsPerS": rate, f"{precision}From": source,
                       f"{precision}LimitMs": macs / rate * 1000.0,
                       f"{precision}GemmSpreadMs": [v * 1000.0 for v in measured.spread(f"gemm.{precision}")]})
    return record


def _limit_for(best: Best, line: str, lines: dict[str, dict]) -> tuple[float | None, str | None]:
    """The limit of `line` that speaks for the best variant, and whose kernels it times (None for
    the physical line, which is no runtime's)."""
    own = lines.get("openvinoAtShapes")
    if line == "atShapes" and own and own["variant"] == best.name:
        return own["limitMs"] if own["byType"] else None, own["kernels"]
    if line != "physical" and not best.onnxruntime:
        return None, None  # ONNX Runtime's kernels say nothing about another runtime's
    # A bf16/fp16 variant (OpenVINO's default precision on AMX or AVX-512 BF16) is bounded by the
    # INT8 rate: in every ISA class it is at least the 16-bit one (AMX 1024 vs 512 MACs per cycle).
    precision = "int8" if best.precision in ("bf16", "fp16") else best.precision
    return lines[line].get(f"{precision}LimitMs"), None if line == "physical" else "ONNX Runtime's"


def _best(best: Best, lines: dict[str, dict], measured: Fastest) -> dict:
    """The best variant against each limit line of its precision that speaks for it."""
    record = {"variant": best.name, "precision": best.precision, "onnxruntime": best.onnxruntime,
              "meanMs": best.mean_ms, "lines": {}}
    if BEST in measured.fastest:
        record["fastestInRoundsMs"] = measured.fastest[BEST] * 1000.0
    for line in LINES:
        limit, kernels = _limit_for(best, line, lines)
        if limit is None:
            continue
        beaten = limit > best.mean_ms
        record["lines"][line] = {"limitMs": limit, "kernels": kernels, "beaten": beaten,
                                 "fraction": None if beaten else limit / best.mean_ms}
    return record


def _record(plan: _Plan, measured: Fastest, macs: int, by_type: dict[str, int], isa: str, threads: int,
            setup_s: float, attempts: int, stability: dict) -> dict:
    ghz = clock.ghz_from_seconds(measured.fastest[CLOCK]) if CLOCK in measured.fastest else None
    at_shapes = _at_shapes(plan, measured, threads)
    lines = {"atShapes": at_shapes, "peak": _peak(plan, measured, macs, by_type, at_shapes, threads),
             "physical": physical_limits(macs, isa, ghz, threads)}
    lines["physical"].update(clockMethod="dependent-add chain" if ghz else None, reportedClockGHz=clock.reported_ghz())
    if plan.openvino:
        lines["openvinoAtShapes"] = _openvino(plan, measured, threads)
    if ghz:
        lines["physical"]["clockSpreadGHz"] = sorted(clock.ghz_from_seconds(s) for s in measured.spread("clock"))
    record = {**lines, "measurement": {
        "rounds": measured.rounds, "seconds": measured.seconds, "setupSeconds": setup_s, "attempts": attempts,
        "stable": measured.stable, "tolerance": stability.get("tolerance", TOLERANCE),
        "patience": stability.get("patience", PATIENCE)}}
    if plan.best:
        record["best"] = _best(plan.best, lines, measured)
    physical = lines["physical"]
    record["notes"] = [
        f"ONNX Runtime's {p.upper()} kernels reached {lines['peak'][f'{p}MacsPerS'] / 1e9:.1f} GMAC/s ({lines['peak'][f'{p}From']}), "
        f"above the physical {physical[f'{p}MacsPerS'] / 1e9:.1f} GMAC/s: the per-cycle figure for {isa} or a layer's MAC count is wrong here"
        for p in PRECISIONS if physical.get(f"{p}MacsPerS") and lines["peak"][f"{p}MacsPerS"] > physical[f"{p}MacsPerS"]]
    return record


def _beaten(record: dict) -> bool:
    return any(line["beaten"] for line in record.get("best", {}).get("lines", {}).values())


def measure_limits(macs: int, by_type: dict[str, int], candidates: list[Candidate], feed: dict, threads: int,
                   isa: str, best: Best | None = None, openvino: OpenVinoKernels | None = None, **stability) -> dict:
    """Every limit line, measured in the same rounds; re-measured once if the best variant beats one.
    `openvino`: the best variant's own OpenVINO compute nodes, when it runs on OpenVINO."""
    started = time.perf_counter()
    graphs, skipped = [], []
    for candidate in candidates:
        try:
            graphs += kernel_graphs(candidate.name, candidate.optimized, feed, threads)
        except Exception as error:  # a graph whose nodes cannot run alone: its kernels are not timed
            skipped.append(f"{candidate.name}: {type(error).__name__}: {str(error).strip()[:200]}")
    plan = _Plan(graphs, best, threads, openvino)
    setup_s = time.perf_counter() - started
    measured = fastest_until_stable(plan.calls, plan.totals, plan.drop, (OVERHEAD,), **stability)
    record = _record(plan, measured, macs, by_type, isa, threads, setup_s, 1, stability)
    if _beaten(record):
        if openvino:
            openvino.restart()  # its means cover the second attempt alone, as the other calls' fastest times do
        measured = _merge(measured, fastest_until_stable(plan.calls, plan.totals, plan.drop, (OVERHEAD,), **stability))
        record = _record(plan, measured, macs, by_type, isa, threads, setup_s, 2, stability)
    if best:
        record["best"]["disturbed"] = _beaten(record)
    record["notes"] += [f"kernels not timed for {text}" for text in skipped]
    return record
