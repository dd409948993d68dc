#!/usr/bin/env bash
# Issue #26's check on a GPU machine, in one run of about 6 minutes (a budget keeps it near 7 at most):
#   1. the machine: nvidia-smi, python, torch/CUDA/cuDNN/Triton/ONNX Runtime versions and providers;
#   2. benchmarks/gpu_crnn.py: the note's GPU rows beside every default GPU variant of the CRNN (should that
#      run out of time, torch.compile took it: again without the compile variants, and so step 3 too);
#   3. mlopt optimize examples/crnn-gpu.yaml (device: cuda, the default GPU set): which variant it picks;
#   4. tests/optimizer/test_gpu.py: the GPU tests (skipped on a CPU machine) for real;
#   5. if time is left: torch-compile-max-autotune (minutes of autotuning) beside torch-cudagraphs-fp16;
#   6. the tables again at the end, so the last lines of the output hold them.
# Run from the repository root. Wheels in .whl/ (pydantic and what it needs, for a machine without it) are
# installed into /tmp/site first. Everything is printed and copied to $OUT (default /tmp/gpu-check):
# gpu_check.log, nvidia-smi.txt, gpu_crnn.md, gpu_crnn-results.json, crnn-gpu-results.json,
# crnn-gpu-report.md, gpu_crnn_autotune.md.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-420}  # seconds for the whole script: no step runs past it, step 5 gets what is left
RUNS=/tmp/gpu-check-runs
rm -rf "$RUNS" && mkdir -p "$RUNS"
step() { echo; echo "=== $1 (at ${SECONDS}s)"; }
within() { local left=$((BUDGET - SECONDS)); echo $(( $1 < left ? $1 : (left > 1 ? left : 1) )); }  # a step's timeout

main() {

step "1. the machine"
nvidia-smi | tee "$OUT/nvidia-smi.txt"
python3 - <<'EOF'
import importlib.metadata as md, platform
import torch
print(f"python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}); GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for name in ("triton", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "numpy", "pydantic", "pyyaml", "rich"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
import onnxruntime as ort
print("onnxruntime providers:", ", ".join(ort.get_available_providers()))
if "CUDAExecutionProvider" not in ort.get_available_providers():
    print("onnxruntime-gpu is absent: its wheel (~255 MB) is four times what one call carries (64 MiB), and files "
          "stay only while the machine is warm, so it is not staged within this check's 15 minutes; the ONNX rows "
          "below fail the CUDA provider check and say so instead of timing the CPU")
EOF

step "2. benchmarks/gpu_crnn.py: the note's GPU rows and the default GPU variants"
SPEC=examples/crnn-gpu.yaml
timeout "$(within 270)" python3 benchmarks/gpu_crnn.py --variants default --output "$RUNS/gpu-crnn" > "$OUT/gpu_crnn.md"
CODE=$?
echo "gpu_crnn.py exit: $CODE"
if [ "$CODE" -eq 124 ]; then
  # torch.compile is the one step that can take minutes: without it, the table and the pick still come out.
  WITHOUT=$(python3 -c "from optimizer.api.spec import RECOMMENDED; print(','.join(r.value for r in RECOMMENDED['cuda'] if 'compile' not in r.value))")
  echo "gpu_crnn.py ran out of time (torch.compile?): again without the compile variants: $WITHOUT"
  timeout "$(within 150)" python3 benchmarks/gpu_crnn.py --variants "$WITHOUT" --output "$RUNS/gpu-crnn" > "$OUT/gpu_crnn.md"
  echo "gpu_crnn.py exit: $?"
  SPEC=$RUNS/crnn-gpu-without-compile.yaml
  python3 - "$SPEC" "$WITHOUT" <<'EOF'
import sys, yaml
spec = yaml.safe_load(open("examples/crnn-gpu.yaml"))
spec["spec"]["variants"] = [{"name": name, "recipe": name} for name in sys.argv[2].split(",")]
yaml.safe_dump(spec, open(sys.argv[1], "w"), sort_keys=False)
EOF
fi
cat "$OUT/gpu_crnn.md"
cp "$RUNS/gpu-crnn/results.json" "$OUT/gpu_crnn-results.json" 2>/dev/null

step "3. mlopt optimize $SPEC"
timeout "$(within 200)" python3 -m optimizer.cli optimize "$SPEC" --output "$RUNS/crnn-gpu" --debug
echo "mlopt optimize exit: $?"
cp "$RUNS/crnn-gpu/results.json" "$OUT/crnn-gpu-results.json" 2>/dev/null
cp "$RUNS/crnn-gpu/report.md" "$OUT/crnn-gpu-report.md" 2>/dev/null

step "4. the GPU tests"
timeout "$(within 150)" python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/optimizer/test_gpu.py
echo "pytest exit: $?"

LEFT=$((BUDGET - SECONDS - 10))
step "5. torch-compile-max-autotune beside torch-cudagraphs-fp16 (${LEFT}s left)"
if [ "$LEFT" -ge 90 ]; then
  timeout "$LEFT" python3 benchmarks/gpu_crnn.py --variants torch-compile-max-autotune,torch-cudagraphs-fp16 \
    --output "$RUNS/gpu-crnn-autotune" > "$OUT/gpu_crnn_autotune.md"
  echo "gpu_crnn.py (max-autotune) exit: $? (124: it ran out of the time left)"
else
  echo "skipped: under 90 s left for autotuning" | tee "$OUT/gpu_crnn_autotune.md"
fi

step "6. the tables again"
cat "$OUT/gpu_crnn.md"
echo; echo "--- max-autotune run:"; cat "$OUT/gpu_crnn_autotune.md"
echo; echo "--- mlopt optimize $SPEC:"
python3 - "$OUT/crnn-gpu-results.json" <<'EOF'
import json, sys
try:
    results = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no results.json: mlopt optimize did not finish (its output is above)")
print(f"best: {results['best']} — {results['bestReason']}")
for v in [results["baseline"], *results["variants"]]:
    latency = v.get("latencyMs") or {}
    speedup = f"{v['speedup']:.2f}x" if v.get("speedup") else "—"
    mean = f"{latency['mean']:.3f} ± {latency['std']:.3f} ms" if latency else "—"
    print(f"  {v['name']:<24} {mean:>22} {speedup:>7}  {v['status']}  {(v.get('error') or '')[:160]}")
print("gpu:", json.dumps(results["environment"].get("gpu")))
EOF
echo "gpu_check done in ${SECONDS}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

main 2>&1 | tee "$OUT/gpu_check.log"  # a pipe, not exec > >(tee): the script ends only once the log is complete
