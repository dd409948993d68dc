"""Reproduce the research note's two CRNN tables on this machine, with speedups.

    .venv/bin/python benchmarks/seed_crnn.py [--runs 50] [--threads 1] [--output DIR]

Runs the real pipeline on zoo:crnn (PyTorch FP32 baseline and every CPU recipe, one process,
same input, same threads) and prints the note's tables (model file, CPU inference mean ± std)
next to the note's own numbers, plus the ONNX Runtime counterparts the note did not have.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from optimizer.console import LogReporter, QuietReporter
from optimizer.pipeline import optimize
from optimizer.steps.report import CONVERSION, QUANTIZATION, by_recipe, mean_std, size_mb
from optimizer.api.spec_loader import parse_spec

NOTE_CONVERSION = {"pytorch-fp32": ("30 MB", "39.3 ms ± 410 µs"), "onnx-fp32": ("30 MB", "29.5 ms ± 2.11 ms")}
NOTE_QUANTIZATION = {"pytorch-fp32": ("30 MB", "39.3 ms ± 410 µs"), "torch-int8-dynamic": ("24 MB", "34.6 ms ± 574 µs"),
                     "torch-int8-static": ("14 MB", "49.2 ms ± 1.59 ms"),
                     "torch-int8-static-dynamic": ("7.6 MB", "40.4 ms ± 1.12 ms")}


def table(title: str, columns, found, note: dict | None) -> str:
    lines = [f"### {title}", "", "| | " + " | ".join(t for t, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    cells = [found.get(recipe) for _, recipe in columns]
    lines.append("| model file (here) | " + " | ".join(size_mb(c) for c in cells) + " |")
    lines.append("| CPU inference (here) | " + " | ".join(mean_std(c) for c in cells) + " |")
    lines.append("| speedup vs PyTorch FP32 (here) | " + " | ".join(
        "—" if c is None or c.speedup is None else f"{c.speedup:.2f}x" for c in cells) + " |")
    if note:
        lines.append("| model file (note) | " + " | ".join(note.get(r, ("—", "—"))[0] for _, r in columns) + " |")
        lines.append("| CPU inference (note) | " + " | ".join(note.get(r, ("—", "—"))[1] for _, r in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (benchmark.rounds)")
    parser.add_argument("--output", default=None, help="keep results here (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    spec = parse_spec({
        "apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "seed-crnn"},
        "spec": {"model": {"source": "zoo:crnn"},
                 "benchmark": {"threads": args.threads, "warmup": args.warmup, "runs": args.runs,
                               "rounds": args.rounds}},
    })
    output = Path(args.output or tempfile.mkdtemp(prefix="seed-crnn-"))
    results = optimize(spec, output, Path.cwd(), QuietReporter() if args.quiet else LogReporter(sys.stderr))
    found = by_recipe(results)
    env = results.environment
    print(f"## The research note's CRNN on this machine\n\n{env.cpu}; flags {', '.join(env.cpuFlags)}; "
          f"torch {env.packages.get('torch')}, onnxruntime {env.packages.get('onnxruntime')}; "
          f"{args.threads} thread(s), {args.warmup} warm-ups, {args.runs} timed runs "
          f"in {args.rounds} interleaved round(s), one process.\n")
    print(table("ONNX conversion (note table 1)", CONVERSION, found, NOTE_CONVERSION) + "\n")
    print(table("Quantization with PyTorch (note table 2)", QUANTIZATION["PyTorch"], found, NOTE_QUANTIZATION) + "\n")
    print(table("Quantization with ONNX Runtime (not in the note)", QUANTIZATION["ONNX Runtime"], found, None) + "\n")
    print(f"best: {results.best} — {results.bestReason}")
    print(f"results: {output}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
