"""Reproduce the research note's YOLOv4 rows on this machine, with the INT8 variants and why ONNX is slow.

    .venv/bin/python benchmarks/seed_yolov4.py [--size 320] [--threads 1] [--runs 20] [--output DIR]
                                               [--pt2e] [--quick]

Runs the real pipeline on zoo:yolov4 (PyTorch FP32 baseline, the default CPU set, which for a
Mish model includes OpenVINO's INT8, plus openvino-fp32; --pt2e adds torchao's PT2E INT8, whose
inductor compile takes minutes on this model), one process, same input, same threads, and prints:

- the note's table (model file, CPU inference PyTorch vs ONNX) with the note's own numbers beside;
- every variant: size, latency, speedup, box mAP@0.5 / @0.5:0.95 against FP32's detections;
- where ONNX Runtime's FP32 time goes, by op type (its profiler), Mish's share named: the
  Softplus/Tanh/Mul it is inlined into and the NCHWc layout reorders around it.
The note's input size is not stated; the zoo's 320 keeps the run to minutes (608 by --size 608).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from optimizer.api.spec import RECOMMENDED
from optimizer.api.spec_loader import parse_spec
from optimizer.console import LogReporter, QuietReporter
from optimizer.pipeline import optimize
from optimizer.steps.report import CONVERSION, by_recipe, mean_std, size_mb

NOTE = {"pytorch-fp32": ("256 MB", "2.6 s ± 221 ms"), "onnx-fp32": ("256 MB", "5.6 s ± 53.3 ms")}
# Mish as exported (Softplus, Tanh, Mul), as mlopt rewrites it for ONNX Runtime (Min, Exp, Div, Mul; its two
# Adds share the op type with the residual adds, so they are not counted), and the NCHWc reorders around it.
MISH_OPS = ("Softplus", "Tanh", "Mul", "Mish", "Min", "Exp", "Div", "ReorderInput", "ReorderOutput")


def note_table(found) -> str:
    lines = ["| | PyTorch FP32 | ONNX Runtime FP32 |", "|---|---:|---:|"]
    cells = [found.get(recipe) for _, recipe in CONVERSION]
    lines.append("| model file (here) | " + " | ".join(size_mb(c) for c in cells) + " |")
    lines.append("| CPU inference (here) | " + " | ".join(mean_std(c) for c in cells) + " |")
    lines.append("| model file (note) | " + " | ".join(NOTE[r][0] for _, r in CONVERSION) + " |")
    lines.append("| CPU inference (note) | " + " | ".join(NOTE[r][1] for _, r in CONVERSION) + " |")
    return "\n".join(lines)


def variants_table(results) -> str:
    lines = ["| variant | size | CPU inference | speedup | box mAP@0.5 / @0.5:0.95 vs FP32 | peak memory | status |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for v in [results.baseline, *results.variants]:
        boxes = (f"{v.detection.vsFp32.map50:.2%} / {v.detection.vsFp32.map50_95:.2%}" if v.detection else "—")
        memory = "—" if v.peakMemoryBytes is None else f"{v.peakMemoryBytes / 1e6:.0f} MB"
        speedup = "—" if v.speedup is None else f"{v.speedup:.2f}x"
        status = v.status + (" ★ best" if v.name == results.best else "") + (f" ({v.error[:80]})" if v.error else "")
        lines.append(f"| {v.name} | {size_mb(v)} | {mean_std(v)} | {speedup} | {boxes} | {memory} | {status} |")
    return "\n".join(lines)


def onnx_profile(output: Path, results, size: int, threads: int) -> str:
    """ONNX Runtime's FP32 time per op type, Mish's pieces marked."""
    from optimizer.engines.feeds import random_feed
    from optimizer.measure.profiling import op_time_split

    fp32 = results.variant("onnx-fp32")
    if not fp32.artifact:
        return "(no onnx-fp32 model to profile)"
    with tempfile.TemporaryDirectory() as scratch:
        rows = op_time_split(output / fp32.artifact, random_feed(results_inputs(results)), threads, 3, Path(scratch))
    lines = ["| op type | ms per inference | share | |", "|---|---:|---:|---|"]
    mish = 0.0
    for row in rows[:14]:
        marker = "Mish / layout around it" if row["op"] in MISH_OPS else ""
        lines.append(f"| {row['op']} | {row['ms']:.1f} | {row['share']:.1%} | {marker} |")
    mish = sum(row["ms"] for row in rows if row["op"] in MISH_OPS)
    total = sum(row["ms"] for row in rows)
    lines.append(f"\nMish's pieces and the layout reorders around them: {mish:.1f} of {total:.1f} ms ({mish / total:.0%}).")
    return "\n".join(lines)


def results_inputs(results):
    from optimizer.api.spec import InputSpec

    return [InputSpec(**spec) for spec in results.model["inputs"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="input side, a multiple of 32 (note: 416 or 608)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=16, help="data.samples: half calibrate, half evaluate")
    parser.add_argument("--budget", type=float, default=60.0, help="benchmark.timeBudgetSeconds per variant")
    parser.add_argument("--pt2e", action="store_true", help="add torchao-pt2e-int8-static (minutes to compile)")
    parser.add_argument("--quick", action="store_true", help="only onnx-fp32, ort-int8-static, openvino-int8")
    parser.add_argument("--output", default=None, help="keep results here (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    recipes = ["onnx-fp32", "ort-int8-static", "openvino-int8"] if args.quick else \
        [r.value for r in RECOMMENDED["cpu"]] + ["openvino-fp32", "openvino-int8"]
    if args.pt2e:
        recipes.append("torchao-pt2e-int8-static")
    spec = parse_spec({
        "apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "seed-yolov4"},
        "spec": {"model": {"source": "zoo:yolov4", "inputs": [{"name": "image", "shape": [1, 3, args.size, args.size],
                                                               "dynamicAxes": {0: "batch"}}]},
                 "variants": [{"name": r, "recipe": r} for r in recipes],
                 "data": {"samples": args.samples},
                 "benchmark": {"threads": args.threads, "warmup": args.warmup, "runs": args.runs,
                               "rounds": min(5, args.runs), "timeBudgetSeconds": args.budget, "scalingBatches": []}},
    })
    output = Path(args.output or tempfile.mkdtemp(prefix="seed-yolov4-"))
    results = optimize(spec, output, Path.cwd(), QuietReporter() if args.quiet else LogReporter(sys.stderr))
    env = results.environment
    found = by_recipe(results)
    print(f"## The research note's YOLOv4 on this machine\n\n{env.cpu}; flags {', '.join(env.cpuFlags)}; "
          f"torch {env.packages.get('torch')}, onnxruntime {env.packages.get('onnxruntime')}; input "
          f"{args.size}×{args.size}; {args.threads} thread(s), {args.warmup} warm-ups, up to {args.runs} timed runs "
          f"({args.budget:g} s budget) per variant, one process.\n")
    print("### ONNX conversion (the note's YOLOv4 columns)\n\n" + note_table(found) + "\n")
    print("### Every variant\n\n" + variants_table(results) + "\n")
    print("### Where ONNX Runtime's FP32 time goes\n\n" + onnx_profile(output, results, args.size, args.threads) + "\n")
    print(f"best: {results.best} — {results.bestReason}")
    compute = results.analysis.compute or {}
    if compute.get("best"):
        print(f"best at {compute['best']['fractionOfLimit']:.0%} of the {compute['best']['precision'].upper()} "
              "limit at the model's shapes (report.md, Compute)")
    print("steps: " + ", ".join(f"{s.step} {s.seconds:.0f} s" for s in results.steps)
          + f"; total {sum(s.seconds for s in results.steps) / 60:.1f} min")
    print(f"results: {output}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
