"""The report step: report.md (tables in the research note's style) and bar charts of size and latency."""

from __future__ import annotations

import math
from pathlib import Path

from optimizer.api.results import EvaluationSize, Results, VariantResult, baseline_label
from optimizer.api.spec import DETECTION_METRICS
from optimizer.api.units import box_cells, detection_columns, format_size, metric_label
from optimizer.artifacts.serving_layout import ServingLayoutError, served_variant, write_serving_layout
from optimizer.steps.data import FLIP_SHARE_OF_BUDGET, argmax_decisions
from optimizer.steps.run import Run
from optimizer.steps.serving_report import serving_chart, serving_section

# The research note's two tables: conversion, then one column per quantization method.
CONVERSION = [("PyTorch FP32", "pytorch-fp32"), ("ONNX Runtime FP32", "onnx-fp32")]
QUANTIZATION = {
    "PyTorch": [("Original", "pytorch-fp32"), ("Dynamic", "torch-int8-dynamic"), ("Static", "torch-int8-static"),
                ("Static + Dynamic", "torch-int8-static-dynamic")],
    "ONNX Runtime": [("Original", "onnx-fp32"), ("Dynamic", "ort-int8-dynamic"), ("Static", "ort-int8-static"),
                     ("Static + Dynamic", "ort-int8-static-dynamic")],
    "OpenVINO": [("FP32", "openvino-fp32"), ("Default precision", "openvino-default"), ("NNCF INT8", "openvino-int8"),
                 ("mlopt's QDQ", "openvino-ort-qdq")],
    "torchao (PT2E)": [("Dynamic", "torchao-pt2e-int8-dynamic"), ("Static", "torchao-pt2e-int8-static")],
}
OPTIONAL_TABLES = ("OpenVINO", "torchao (PT2E)")  # shown only when the spec asked for one of its variants


def mean_std(variant: VariantResult | None) -> str:
    """'24.4 ms ± 410 µs', as the research note writes latencies."""
    if variant is None or variant.latencyMs is None:
        return "—"
    lat = variant.latencyMs
    std = f"{lat.std * 1000:.0f} µs" if lat.std < 1 else f"{lat.std:.2f} ms"
    return f"{lat.mean:.2f} ms ± {std}"


def size_mb(variant: VariantResult | None) -> str:
    return format_size(variant.sizeBytes if variant else None)


def by_recipe(results: Results) -> dict[str, VariantResult]:
    found = {results.baseline.recipe: results.baseline}
    for variant in results.variants:
        if variant.status in ("ok", "rejected"):
            found.setdefault(variant.recipe, variant)
    return found


def _columns_table(columns: list[tuple[str, str]], found: dict[str, VariantResult], device: str,
                   baseline: str = "PyTorch FP32") -> list[str]:
    cells = [found.get(recipe) for _, recipe in columns]
    return [
        "| | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
        "| model file | " + " | ".join(size_mb(c) for c in cells) + " |",
        f"| {device.upper()} inference | " + " | ".join(mean_std(c) for c in cells) + " |",
        f"| speedup vs {baseline} | " + " | ".join("—" if c is None or c.speedup is None else f"{c.speedup:.2f}x" for c in cells) + " |",
    ]


def _fmt(value, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def variants_table(results: Results) -> list[str]:
    accuracy_column = results.accuracyMetric not in ("agreement", "box-agreement", "map50", "map50-95")
    boxes = detection_columns(results)
    metric = f" {metric_label(results.accuracyMetric)} |" if accuracy_column else ""
    box_titles = ["box mAP50 / 50-95 vs FP32", "mAP50 / 50-95 (labels)"][:boxes]
    extra = "".join(f" {title} |" for title in box_titles) + metric + " peak memory |"
    lines = [f"| variant | recipe | runtime | size | mean ± std | p50 | p90 | p99 | speedup | max abs Δ | cosine | argmax agree |{extra} status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (boxes + accuracy_column + 1) + "---|"]
    for v in [results.baseline, *results.variants]:
        lat, fid = v.latencyMs, v.fidelity
        status = f"**{v.status} ★ best**" if v.name == results.best else v.status
        lines.append(
            f"| {v.name} | {v.recipe} | {v.runtime or '—'} | {size_mb(v)} | {mean_std(v)} | "
            f"{_fmt(lat and lat.p50, '{:.2f}')} | {_fmt(lat and lat.p90, '{:.2f}')} | {_fmt(lat and lat.p99, '{:.2f}')} | "
            f"{_speedup(v)} | {_fmt(fid and fid.maxAbsDiff, '{:.2g}')} | {_fmt(fid and fid.cosine, '{:.5f}')} | "
            f"{_fmt(fid and fid.argmaxAgreement, '{:.2%}')} |"
            + "".join(f" {cell} |" for cell in (box_cells(v, boxes) if boxes else []))
            + (f" {_fmt(v.accuracy, '{:.2%}')} |" if accuracy_column else "")
            + f" {format_size(v.peakMemoryBytes)} | {status} |"
        )
    return lines


def _speedup(variant: VariantResult) -> str:
    """"6.28x (5.95-6.61)": the mean ratio, and its range over the interleaved rounds."""
    if variant.speedup is None:
        return "—"
    low_high = variant.speedupRange
    spread = f" ({low_high[0]:.2f}–{low_high[1]:.2f})" if low_high and low_high[0] != low_high[1] else ""
    return f"{variant.speedup:.2f}x{spread}"


def _budget(results: Results) -> str:
    budget = results.accuracyBudget or {}
    parts = []
    if budget.get("maxAccuracyDrop") is not None:
        parts.append(f"at most {budget['maxAccuracyDrop'] * 100:.2f} points below FP32")
    if budget.get("maxRelativeAccuracyDrop") is not None:
        parts.append(f"at most {budget['maxRelativeAccuracyDrop']:.2%} of FP32's accuracy lost")
    fp32 = _fmt(results.baseline.accuracy, "{:.2%}")
    return (f"FP32 {metric_label(results.accuracyMetric)}: {fp32}; budget: "
            + (" and ".join(parts) or "none") + "." + _decisions(results))


def _decisions(results: Results) -> str:
    """How sure the verdict is: the decisions it rests on, and what one flip weighs against the budget."""
    size = results.evaluation
    if size is None:
        return ""
    text = (f" The verdict rests on {size.decisions:,} decisions (the argmax of the first output over "
            f"{size.items:,} held-out items): one flipped decision moves the accuracy by {size.oneDecision * 100:.2f} "
            "points")
    if size.budget:
        text += f", {size.oneDecision / size.budget:.0%} of the budget"
    if size.sizedFromBudget:
        text += " (the split was sized from the budget)"
    if size.budget and size.decisions:  # the normal approximation of a binomial proportion at the budget's drop
        margin = 1.96 * math.sqrt(size.budget * (1 - size.budget) / size.decisions)
        text += (f"; a drop measured at the budget is known to ±{margin * 100:.2f} points (95% interval), so "
                 "a variant this close to the limit is a judgement call")
    if size.budget is not None and size.oneDecision > FLIP_SHARE_OF_BUDGET * size.budget:
        text += (f". **One flip is more than {FLIP_SHARE_OF_BUDGET:.0%} of the budget, so a sound variant can be "
                 "rejected (or a poor one kept) on a single decision**: give more evaluation data (data.samples, or "
                 "leave it unset to size the split from the budget)")
    return text + "."


def fallback_section(results: Results) -> list[str]:
    """The accuracy fallback: per retried variant, the worst nodes and every try."""
    out = []
    for v in results.variants:
        if not v.fallback:
            continue
        f = v.fallback
        outcome = (f"recovered as **{f.variant}** with {len(f.excludedNodes)} node(s) in FP32"
                   if f.recovered else f"not recovered: {f.reason}")
        out += [f"### {v.name}: {outcome} ({f.seconds:.2f} s)", ""]
        if f.ranking:
            out += ["Most sensitive nodes (noise each adds, FP32 vs quantized activations):", "",
                    "| node | op | input SQNR dB | output SQNR dB | added noise |", "|---|---|---:|---:|---:|"]
            out += [f"| `{r['node']}` | {r['opType']} | {r['inputSqnrDb']:.1f} | {r['outputSqnrDb']:.1f} | "
                    f"{r['addedNoise']:.3g} |" for r in f.ranking[:5]]
            out.append("")
        out += ["| try | nodes kept in FP32 | accuracy | size | seconds | within budget |",
                "|---:|---|---:|---:|---:|---|"]
        for index, t in enumerate(f.tries, 1):
            nodes = ", ".join(f"`{n}`" for n in t.excludedNodes)
            out.append(f"| {index} | {nodes} | {_fmt(t.accuracy, '{:.2%}')} | {format_size(t.sizeBytes)} | "
                       f"{t.seconds:.2f} | {'yes' if t.withinBudget else (t.error or 'no')} |")
        out.append("")
    return ["## Accuracy fallback", "", *out] if out else []


def calibration_section(results: Results) -> list[str]:
    """compareCalibration: calibration method → accuracy, latency, per spec variant."""
    groups: dict[str, list[VariantResult]] = {}
    for v in results.variants:
        if v.calibrationOf and not v.name.endswith("+fallback"):
            groups.setdefault(v.calibrationOf, []).append(v)
    out = []
    for name, members in groups.items():
        out += [f"## Calibration methods: {name}", "",
                f"| calibration | variant | {metric_label(results.accuracyMetric)} | mean ± std | size | status |",
                "|---|---|---:|---:|---:|---|"]
        for v in members:
            method = v.lineage.options.get("calibration", "—") if v.lineage else "—"
            out.append(f"| {method} | {v.name} | {_fmt(v.accuracy, '{:.2%}')} | {mean_std(v)} | {size_mb(v)} | {v.status} |")
        out.append("")
    return out


def _notes(results: Results) -> list[str]:
    lines = [f"- **inputs**: {note}" for note in results.model.get("inputNotes", [])]
    for attempt in results.model.get("exportAttempts", []):
        lines.append(f"- **export** ({attempt['route']}): {attempt['reason']}")
    for v in results.variants:
        for text in ([v.error] if v.error else []) + v.notes:
            lines.append(f"- **{v.name}**: {text}")
    return lines or ["- none"]


def _hardware_lines(record: dict | None) -> list[str]:
    if not record:
        return []
    head = f"- Quantized for: **{record['isa']}** ({record['chosenBy']}; this machine: {record['detected']}), " \
           f"INT8 weights {'7-bit (reduce_range)' if record['reduceRange'] else 'full 8-bit'}"
    return [head, *[f"  - {reason}" for reason in record["reasons"]]]


def gpu_line(gpu) -> str:
    """The GPU a CUDA run measured on, in one line (results.json: environment.gpu)."""
    tf32 = ", ".join(f"{kind} {'on' if allowed else 'off'}" for kind, allowed in gpu.tf32.items())
    return (f"{gpu.name} (compute {gpu.capability}, {gpu.memoryGiB:g} GiB, {gpu.multiprocessors} SMs), driver "
            f"{gpu.driver or 'unknown (no nvidia-smi)'}, CUDA {gpu.cuda}, cuDNN {gpu.cudnn}, torch {gpu.torch}; "
            f"TF32 for FP32: {tf32}")


def _library_warnings(results: Results) -> list[str]:
    """What PyTorch, ONNX Runtime and friends warned about during the run (kept off the terminal)."""
    if not results.warnings:
        return []
    return ["## Library warnings", "", *[f"- {text}" for text in results.warnings], ""]


def _op_mix(results: Results) -> list[str]:
    lines = ["| variant | ops after ONNX Runtime optimization |", "|---|---|"]
    for v in results.variants:
        if v.opCounts:
            lines.append(f"| {v.name} | " + ", ".join(f"{op} ×{n}" for op, n in list(v.opCounts.items())[:12]) + " |")
    return lines


def _ms(value) -> str:
    return "—" if value is None else f"{value:.2f} ms"


def _rate(macs_per_s: float) -> str:
    return f"{macs_per_s / 1e9:.1f} GMAC/s"


def of_limit(limit_ms: float | None, time_ms: float | None) -> str:
    """How close a time gets to its limit, as a share that never exceeds 100%: a time below its
    limit means the limit was measured at a disturbed moment, and the text says so instead."""
    if limit_ms is None or not time_ms:
        return "—"
    if limit_ms > time_ms:
        return "faster than this limit (limit measured while disturbed)"
    return f"{limit_ms / time_ms:.0%}"


def _kernel_sources(at_shapes: dict, precision: str) -> str:
    sources = {}
    for layer, limits in at_shapes["byType"].items():
        variant = limits.get(f"{precision}From")
        if variant and limits.get(f"{precision}Ms"):
            sources.setdefault(variant, []).append(layer)
    parts = []
    for variant, layers in sources.items():
        kernels = at_shapes["variants"].get(variant, {}).get("kernels", {})
        parts.append(f"{', '.join(sorted(layers))} from {variant} (" + ", ".join(f"{op} ×{n}" for op, n in kernels.items()) + ")")
    return "; ".join(parts) or "none"


def _limits_table(c: dict) -> list[str]:
    at_shapes, peak, physical = c["atShapes"], c["peak"], c["physical"]
    threads = physical["threads"]

    def cell(record: dict, precision: str) -> str:
        return _ms(record.get(f"{precision}LimitMs"))

    if physical.get("clockGHz"):
        reported = f"; the OS reports {physical['reportedClockGHz']:.2f} GHz" if physical.get("reportedClockGHz") else ""
        clock = (f"{physical['clockGHz']:.2f} GHz, the clock a dependent-add chain measured in the same rounds "
                 f"({physical['clockSpreadGHz'][0]:.2f}–{physical['clockSpreadGHz'][1]:.2f}{reported})")
    else:
        clock = "no clock: the dependent-add chain cannot run on this machine"
    rows = [
        ("physical", cell(physical, "fp32"), cell(physical, "int8"),
         f"the MACs at {physical['isa']}'s {physical['fp32MacsPerCycle']} FP32 / {physical['int8MacsPerCycle']} INT8 "
         f"MACs per cycle and core × {clock} × {threads} thread(s): no runtime can beat it (docs/limits.md)"),
        ("kernels' peak", cell(peak, "fp32"), cell(peak, "int8"),
         f"the MACs at the fastest rate ONNX Runtime's kernels reached here: {_rate(peak['fp32MacsPerS'])} FP32 "
         f"({peak['fp32From']}), {_rate(peak['int8MacsPerS'])} INT8 ({peak['int8From']}); constant, prepacked weights"),
        ("at this model's shapes", cell(at_shapes, "fp32"), cell(at_shapes, "int8"),
         "per layer type, the fastest of the ONNX Runtime variants' own compute kernels, each run alone on the "
         "tensors it gets in the variant, with its prepacked weights, nothing between them, net of one session.run's "
         f"own cost ({at_shapes.get('runOverheadMs', 0.0) * 1000:.0f} µs, timed on an empty graph): FP32 "
         f"{_kernel_sources(at_shapes, 'fp32')}; INT8 {_kernel_sources(at_shapes, 'int8')}"),
    ]
    own = c.get("openvinoAtShapes")
    if own and own["byType"]:
        ms = f"{own['limitMs']:.2f} ({own['precision'].upper()})"
        kernels = "; ".join(f"{layer} ×{row['nodes']} {row['ms']:.2f} ms (" + ", ".join(
            f"{kernel} ×{n}" for kernel, n in row["execTypes"].items()) + ")" for layer, row in own["byType"].items())
        rows.append((f"at this model's shapes, OpenVINO's kernels ({own['variant']})", ms if own["precision"] != "int8" else "—",
                     ms if own["precision"] == "int8" else "—",
                     f"{own['variant']}'s own compute nodes inside its inferences, each node's mean over the rounds "
                     f"(OpenVINO's performance counters keep only a mean), back-to-back bursts of {own['burst']}: {kernels}"))
    return ["| limit | FP32 | INT8 | what it is |", "|---|---:|---:|---|",
            *[f"| {name} | {fp32} | {int8} | {what} |" for name, fp32, int8, what in rows]]


def _measurement(c: dict) -> str:
    m, at_shapes = c["measurement"], c["atShapes"]
    spreads = [f"{p.upper()} {at_shapes[f'{p}SpreadMs'][0]:.2f}–{at_shapes[f'{p}SpreadMs'][1]:.2f} ms (median "
               f"{at_shapes[f'{p}MedianRoundMs']:.2f})" for p in ("fp32", "int8") if at_shapes.get(f"{p}SpreadMs")]
    settled = (f"until {m['patience']} rounds in a row moved no fastest time by more than {m['tolerance']:.0%}"
               if m["stable"] else f"and stopped at its cap before {m['patience']} rounds in a row stayed within "
               f"{m['tolerance']:.0%}: treat the limits as rough")
    again = "; measured twice, because the best variant beat a limit the first time" if m["attempts"] > 1 else ""
    return (f"The limits were measured right after the benchmark, in {m['rounds']} interleaved rounds "
            f"({m['seconds']:.1f} s, plus {m['setupSeconds']:.1f} s to set up), {settled}{again}. Each is the fastest "
            "time seen of each kernel (noise only slows a run)"
            + (f"; one round's kernels at the model's shapes took {' and '.join(spreads)}." if spreads else ".")
            + _openvino_spread(c.get("openvinoAtShapes")))


def _openvino_spread(own: dict | None) -> str:
    if not own or not own.get("spreadMs"):
        return ""
    return (f" The sum of {own['variant']}'s OpenVINO compute nodes' means so far moved between "
            f"{own['spreadMs'][0]:.2f} and {own['spreadMs'][1]:.2f} ms over the rounds (median {own['medianRoundMs']:.2f}).")


def _best_against_limits(best: dict) -> str:
    precision = best["precision"].upper()
    physical = (f"the INT8 physical limit (the INT8 rate bounds {precision} too)" if precision in ("BF16", "FP16")
                else f"the {precision} physical limit")
    names = {"atShapes": f"the {precision} limit at the model's shapes", "peak": f"the {precision} kernels' peak limit",
             "physical": physical}
    if best["lines"].get("atShapes", {}).get("kernels") == "OpenVINO's":
        names["atShapes"] = f"the {precision} limit at the model's shapes (its own OpenVINO kernels)"
    fastest = (f"; {_ms(best['fastestInRoundsMs'])} fastest in the same rounds"
               if best.get("fastestInRoundsMs") is not None else "")
    parts, beaten = [], []
    for line, record in best["lines"].items():
        if record["beaten"]:
            beaten.append(f"{names[line]} ({_ms(record['limitMs'])})")
        else:
            parts.append(f"{of_limit(record['limitMs'], best['meanMs'])} of {names[line]}")
    text = f"- The best variant, {best['variant']} ({_ms(best['meanMs'])} mean{fastest}), runs at " + (", ".join(parts) or "—") + "."
    if beaten:
        text += (f" It ran faster than {' and '.join(beaten)}, measured twice: the machine was disturbed while that "
                 "limit was measured, so no share of it is given.")
    if not best["onnxruntime"]:
        text += (" It does not run on ONNX Runtime: ONNX Runtime's at-shape and peak lines bound only ONNX Runtime "
                 "variants" + (", so its at-shape line is its own OpenVINO kernels." if "atShapes" in best["lines"] else "."))
    return text


def _compute_section(c: dict) -> list[str]:
    """MACs, the three limits they imply (physical, the kernels' peak, at the model's shapes), the best
    variant against each, and how close each layer type gets."""
    by_type = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in sorted(c["byType"].items(), key=lambda kv: -kv[1]))
    out = ["## Compute", "",
           f"- {c['macs'] / 1e6:.1f} M multiply-accumulates per inference ({by_type}).", "",
           "The fastest this model can run here, three ways; each is a lower bound on latency, the physical one for "
           "every runtime, the other two for ONNX Runtime's variants"
           + (" (and OpenVINO's kernels for the best variant, which runs on OpenVINO)" if c.get("openvinoAtShapes") else "")
           + ":", "",
           *_limits_table(c), "", _measurement(c), ""]
    if c.get("best"):
        out.append(_best_against_limits(c["best"]))
    out += [f"- {note}" for note in c.get("notes", [])]
    if c.get("byLayer"):
        out += ["", "How close each layer type gets (the best variant's profile against the kernels at the layer's "
                "shapes and the kernels' peak, both of the best variant's precision):", "",
                "| layers | MACs | ran as | ms per inference | kernels at its shapes | of that | rate | of peak |",
                "|---|---:|---|---:|---:|---:|---:|---:|"]
        for r in c["byLayer"]:
            limit = r.get("shapeLimitMs")
            peak_ms = r["macs"] / c["peak"][f"{r['limitPrecision']}MacsPerS"] * 1000.0
            at = f"{limit:.3f} ms | {of_limit(limit, r['ms'])}" if limit is not None else "— | —"
            out.append(f"| {r['layer']} | {r['macs'] / 1e6:.1f} M | {', '.join(r['ranAs'])} | {r['ms']:.3f} | {at} | "
                       f"{_rate(r['macsPerS'])} | {of_limit(peak_ms, r['ms'])} {r['limitPrecision'].upper()} |")
        if c.get("otherOpsMs") is not None:
            out.append(f"| everything else | — | pooling, reshapes, (de)quantization | {c['otherOpsMs']:.3f} | — | — | — | — |")
    return out + [""]


def _analysis(results: Results) -> list[str]:
    analysis, out = results.analysis, []
    if analysis.compute:
        out += _compute_section(analysis.compute)
    if analysis.profile:
        out += [f"## Where the time goes ({analysis.profiledVariant}, ONNX Runtime profiler)", "",
                "| op type | ms per inference | share |", "|---|---:|---:|"]
        out += [f"| {row['op']} | {row['ms']:.3f} | {row['share']:.1%} |" for row in analysis.profile[:12]]
        kernels = sum(row["ms"] for row in analysis.profile)
        profiled = results.variant(analysis.profiledVariant)  # the best variant, always among them
        if profiled.latencyMs:
            mean = profiled.latencyMs.mean
            rest = (f"the other {mean - kernels:.2f} ms is the runtime's own work per run and per node"
                    if kernels < mean else "profiling adds its own cost, and the two were timed at different moments")
            out += ["", f"Kernels add up to {kernels:.2f} ms per inference (profiled separately) against the "
                        f"{mean:.2f} ms measured mean: {rest}."]
        out.append("")
    if analysis.scaling:
        out += ["## Scaling", "", "| variant | batch | threads | latency | throughput (samples/s) |",
                "|---|---:|---:|---:|---:|"]
        out += [f"| {r['variant']} | {r['batch']} | {r['threads']} | {r['latencyMs']:.2f} ms"
                + (" (benchmark)" if r.get("source") == "benchmark" else "") + f" | {r['throughput']:.1f} |"
                for r in analysis.scaling]
        out += ["", "A cell marked (benchmark) is the benchmark's mean for that variant, not timed again; the "
                "others are timed here, after one warm-up.", ""]
    if analysis.tuning:
        t, chosen = analysis.tuning, analysis.tuning["chosen"]
        out += [f"## Session tuning ({t['variant']})", "",
                f"Chosen: intra-op {chosen['intraOpThreads']}, inter-op {chosen['interOpThreads']}, "
                f"{chosen['executionMode']}, optimization level {chosen['optimizationLevel']} → {chosen['meanMs']:.2f} ms.", "",
                "| intra | inter | mode | level | mean | p50 |", "|---:|---:|---|---|---:|---:|"]
        out += [f"| {r['intraOpThreads']} | {r['interOpThreads']} | {r['executionMode']} | {r['optimizationLevel']} | "
                f"{r['meanMs']:.2f} | {r['p50Ms']:.2f} |" for r in t["tried"]]
        out.append("")
    out += [f"- {note}" for note in analysis.notes]
    return out + ([""] if analysis.notes else [])


def markdown(results: Results) -> str:
    env = results.environment
    found = by_recipe(results)
    device = env.device
    out = [
        f"# mlopt report: {results.name}",
        "",
        f"Model `{results.model['source']}` ({results.model['format']}); data: {results.dataset}; "
        f"{env.threads} thread(s) on {device}, {results.baseline.latencyMs.runs if results.baseline.latencyMs else 0} timed runs per variant.",
        "",
        f"**Best: {results.best or 'none'}** — {results.bestReason}.",
        "",
        "## ONNX conversion",
        "",
        *_columns_table(CONVERSION, found, device, baseline_label(results.baseline)),
        "",
    ]
    for runtime, columns in QUANTIZATION.items():
        if runtime in OPTIONAL_TABLES and not any(recipe in found for _, recipe in columns):
            continue
        out += [f"## Quantization with {runtime}", "",
                *_columns_table(columns, found, device, baseline_label(results.baseline)), ""]
    out += [
        "## All variants",
        "",
        *variants_table(results),
        "",
        _budget(results),
        "",
        f"Accuracy metric: `{results.accuracyMetric}`"
        + (" (agreement of each variant's argmax with the FP32 model's; no labels)." if results.accuracyMetric == "agreement"
           else " (COCO mAP@0.5 of each variant's detections, after NMS, with FP32's detections as ground truth; no labels)."
           if results.accuracyMetric == "box-agreement" else "."),
        "Latency is measured in one process on the same input after warm-up, in "
        f"{results.baseline.latencyMs.rounds if results.baseline.latencyMs else 1} round(s) taken in turn "
        "across variants; the speedup in brackets is its lowest and highest over those rounds. Sizes are the "
        "saved files: the PyTorch FP32 baseline as its state_dict, torch.ao INT8 variants as TorchScript, "
        "torchao PT2E variants as the quantized torch.export program (.pt2), the PyTorch GPU variants as the "
        "torch.export program at their dtype (.pt2).",
        "",
        *serving_section(results),
        *calibration_section(results),
        *fallback_section(results),
        "## Notes and warnings",
        "",
        *_notes(results),
        "",
        *_library_warnings(results),
        "## Operator mix",
        "",
        *_op_mix(results),
        "",
        *_analysis(results),
        "## Environment",
        "",
        f"- CPU: {env.cpu}; INT8-relevant flags: {', '.join(env.cpuFlags) or 'none'}",
        f"- Python {env.python}; " + ", ".join(f"{k} {v}" for k, v in env.packages.items()),
        f"- ONNX Runtime providers available: {', '.join(env.availableProviders)}",
        *([f"- GPU: {gpu_line(env.gpu)}"] if env.gpu else []),
        *_hardware_lines(env.hardware),
        *([f"- Kubernetes QoS class of the worker pod: {env.qosClass}"
           + (" (dedicated cores)" if env.qosClass == "Guaranteed" else " (CPU shared with neighbours above its request)")]
          if env.qosClass else []),
        "",
        "## Pipeline steps",
        "",
        "| step | seconds |",
        "|---|---:|",
        *[f"| {s.step} | {s.seconds:.1f} |" for s in results.steps],
        "",
        "Charts: `size.png`, `latency.png`. Machine-readable: `results.json`.",
        "",
    ]
    return "\n".join(out)


def charts(results: Results, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display in Jobs or CI
    import matplotlib.pyplot as plt

    measured = [v for v in [results.baseline, *results.variants] if v.latencyMs and v.sizeBytes]
    names = [v.name for v in measured]
    colors = ["#2a9d8f" if v.name == results.best else ("#adb5bd" if v.status != "ok" else "#457b9d") for v in measured]
    paths = []
    for filename, title, values, errors, unit in (
        ("size.png", "Model file size", [v.sizeBytes / 1e6 for v in measured], None, "MB"),
        ("latency.png", f"Latency ({results.environment.device}, {results.environment.threads} thread)",
         [v.latencyMs.mean for v in measured], [v.latencyMs.std for v in measured], "ms (mean ± std)"),
    ):
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
        bars = ax.bar(names, values, yerr=errors, color=colors, capsize=3)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=2, fontsize=8)
        ax.axhline(values[0], color="#e63946", linestyle="--", linewidth=1, label=f"baseline: {baseline_label(results.baseline)}")
        ax.set_title(f"{results.name}: {title}")
        ax.set_ylabel(unit)
        ax.legend(loc="upper right", fontsize=8)
        ax.tick_params(axis="x", labelrotation=30)
        plt.setp(ax.get_xticklabels(), ha="right")
        fig.tight_layout()
        path = directory / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(results: Results, directory: Path) -> None:
    charts(results, directory)
    serving_chart(results, directory)
    (directory / "report.md").write_text(markdown(results))


def _model_record(run: Run) -> dict:
    record = {"source": run.loaded.source, "format": run.loaded.format,
              "inputs": [spec.model_dump(mode="json") for spec in run.loaded.inputs]}
    if run.loaded.carried_files:  # a server loads them beside the model it serves
        record["carriedFiles"] = [f"models/{path.name}" for path in run.loaded.carried_files]
    if run.input_notes:
        record["inputNotes"] = run.input_notes
    if run.export:
        record.update(exporter=run.export.exporter, opset=run.spec.spec.export.opset,
                      parityShapes=run.export.checked_shapes)
    elif run.export_error:
        record["exportError"] = run.export_error
    if run.export_attempts:
        record["exportAttempts"] = run.export_attempts  # every route tried, in order, with why it failed
    return record


def evaluation_size(run: Run) -> EvaluationSize | None:
    """How many argmax decisions of the FP32 reference's first output the accuracy verdict rests on."""
    if not run.reference or run.metric in DETECTION_METRICS:  # a detector's verdict is box mAP, not argmaxes
        return None
    decisions = sum(argmax_decisions(outputs[0]) for outputs in run.reference if outputs)
    acceptance = run.spec.spec.acceptance
    budgets = [b for b in (acceptance.maxAccuracyDrop, acceptance.maxRelativeAccuracyDrop) if b is not None]
    return EvaluationSize(items=len(run.reference), decisions=decisions, oneDecision=1 / max(decisions, 1),
                          budget=min(budgets) if budgets else None, sizedFromBudget=run.dataset.sized_from_budget)


def report_step(run: Run) -> None:
    """Assemble results.json's record from the run, and write report.md and the charts beside it."""
    spec = run.spec
    run.record = Results(
        name=spec.metadata.name, model=_model_record(run), accuracyMetric=run.metric,
        accuracyBudget={"maxAccuracyDrop": spec.spec.acceptance.maxAccuracyDrop,
                        "maxRelativeAccuracyDrop": spec.spec.acceptance.maxRelativeAccuracyDrop},
        dataset=run.dataset.description, evaluation=evaluation_size(run),
        baseline=run.baseline, variants=list(run.results.values()), best=run.best, bestReason=run.best_reason,
        environment=run.env, analysis=run.analysis, steps=run.steps, warnings=run.warnings.lines(),
        target=run.target, serving=run.serving, recommendation=run.recommendation,
    )
    write_report(run.record, run.staging)
    write_serving(run)


def write_serving(run: Run) -> None:
    """serving/: the variant to serve as a Triton / OVMS model repository and a KServe InferenceService
    placed where it was measured (the run's target, else spec.job), pointing at where the run is stored,
    with the instances, batch and replicas the serving sweep found. Copies one model, runs none."""
    variants = run.record.variants
    preferred = run.recommendation.variant if run.recommendation else run.record.best
    variant, why = served_variant(variants, preferred)
    if variant is not None and run.recommendation and variant.name == preferred:
        why = f"the recommended variant ({run.recommendation.basis})"
    if variant is None:
        run.reporter.log(f"serving layout: none written: {why}")
        return
    spec = run.spec
    node_selector, resources, tolerations, device = placement(spec, run.target)
    instances, batch, replicas = _served_shape(run, variant.name)
    try:
        write_serving_layout(
            run.staging, run.staging / variant.artifact, variant=variant.name, why=why, name=spec.metadata.name,
            output=run.output_uri or spec.spec.output, namespace=getattr(spec.metadata, "namespace", None),
            node_selector=node_selector, tolerations=tolerations, resources=resources, device=device,
            instance_count=instances, min_replicas=replicas,
            **({"max_batch_size": batch} if batch > 1 else {}))
    except ServingLayoutError as error:  # the run's results stand without it; run.log says why
        run.reporter.log(f"serving layout: none written: {error}")
        return
    run.reporter.log(f"serving layout: {variant.name} in serving/ ({why}); see serving/README.md")


def _served_shape(run: Run, variant: str) -> tuple[int, int, int | None]:
    """Instances (the sweep's streams at the SLO), batch and replicas (for spec.demand) to serve with;
    1, 1 and None without a sweep."""
    curve = next((c for c in run.serving.curves if c.variant == variant), None) if run.serving else None
    point = curve.atSLO if curve else None
    offer = next((o for o in run.recommendation.offers if o.variant == variant), None) if run.recommendation else None
    return (point.concurrency if point else 1, point.batch if point else 1, offer.replicas if offer else None)


def placement(spec, target_name: str | None) -> tuple[dict[str, str], dict, list[dict], str]:
    """nodeSelector, resources, tolerations and device of the pod that measured this run: spec.job's,
    with a target's (spec.targets) over it as the operator builds that target's Job."""
    target = spec.target(target_name) if target_name and spec.spec.targets else None
    device = target.device if target is not None and "device" in target.model_fields_set else spec.spec.benchmark.device
    node_selector = {**spec.spec.job.nodeSelector, **(target.nodeSelector if target else {})}
    resources, tolerations = job_placement(spec, target, device)
    return node_selector, resources, tolerations, device


def job_placement(spec, target=None, device: str | None = None) -> tuple[dict, list[dict]]:
    """The resources and tolerations the operator gives the worker pod (operator/job.py: requests =
    limits for qos guaranteed; a cuda run gets one nvidia.com/gpu and tolerates the GPU taint), so the
    served model lands where it was measured. The operator's copy cannot be imported from here."""
    job = spec.spec.job
    wanted = spec.pod_resources(target)
    limits = wanted.limits.model_dump(exclude_none=True)
    requests = dict(limits) if job.qos == "guaranteed" else wanted.requests.model_dump(exclude_none=True)
    tolerations = [t.model_dump(exclude_none=True) for t in job.tolerations]
    tolerations += [t.model_dump(exclude_none=True) for t in (target.tolerations if target else [])]
    if (device or spec.spec.benchmark.device) == "cuda":
        limits["nvidia.com/gpu"] = "1"
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    return {"requests": requests, "limits": limits}, tolerations
