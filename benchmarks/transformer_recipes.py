"""The transformer recipes on a BERT-class encoder and a GPT-2-class LM, as Hugging Face folders.

    .venv/bin/python benchmarks/transformer_recipes.py [--output DIR] [--quick]

Builds both models from configs with `transformers` (random weights: no model hub here), saves them with
`save_pretrained`, and runs `mlopt optimize` on each in a fresh process, as a user would:

- the encoder (4 layers, width 256, 4 heads, 128 tokens) from the default (dynamo) export and from
  `export.exporter: legacy`, whose attention the transformer optimizer fuses;
- the LM (4 layers, width 512, 8 heads, 16k vocabulary) at 128 tokens (a prompt, one forward) and at
  1 token with no past: the forward a cached generation step runs for its weights (every MatMul at
  M = 1), without the attention over earlier tokens a KV cache adds, so it is the weight-bound part
  of a decode step, not a tokens/s figure;
- 4-bit weight-only at block 32 and 128 and accuracy level 4 and 0, to show why the defaults are
  what they are on this CPU.

Prints one markdown table per model and shape: size, mean ± std, speed against onnx-fp32, argmax
agreement with PyTorch FP32, status. Random weights make an LM's argmax fragile (near-flat logits),
so agreement here says how much a recipe perturbs, not a task's accuracy. Timing needs a quiet
machine: run it when nothing else is using the CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["onnx-fp32", "ort-int8-dynamic", "ort-transformer-fp32", "ort-transformer-int8-dynamic",
           "ort-int4-weight-only"]
INT4_CHOICES = [{"name": "int4-block128", "recipe": "ort-int4-weight-only", "blockSize": 128},
                {"name": "int4-level0", "recipe": "ort-int4-weight-only", "accuracyLevel": 0}]


def save_models(directory: Path) -> tuple[Path, Path]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    bert, gpt2 = directory / "bert", directory / "gpt2"
    BertForSequenceClassification(BertConfig(
        vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=256, num_labels=3)).eval().save_pretrained(bert)
    GPT2LMHeadModel(GPT2Config(vocab_size=16000, n_positions=256, n_embd=512, n_layer=4, n_head=8,
                               bos_token_id=0, eos_token_id=0)).eval().save_pretrained(gpt2)
    return bert, gpt2


def text_inputs(tokens: int, vocab: int, mask: bool) -> list[dict]:
    axes = {0: "batch", 1: "sequence"}
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": [1, tokens], "dynamicAxes": axes,
               "valueRange": [0, vocab - 1]}]
    if mask:
        inputs.append({"name": "attention_mask", "dtype": "int64", "shape": [1, tokens], "dynamicAxes": axes,
                       "valueRange": [1, 1]})
    return inputs


def run(directory: Path, name: str, model: dict, variants: list[dict], quick: bool, export: dict | None = None) -> dict:
    spec = {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": name},
            "spec": {"model": model, "variants": variants, "output": f"{name}/",
                     "benchmark": {"warmup": 3, "runs": 20 if quick else 50, "scalingBatches": []},
                     **({"data": {"samples": 64}} if quick else {}), **({"export": export} if export else {})}}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    print(f"running {name} …", file=sys.stderr, flush=True)
    subprocess.run([str(REPO / ".venv/bin/mlopt"), "optimize", str(path), "--quiet"], cwd=directory, check=False,
                   stdout=subprocess.DEVNULL)
    return json.loads((directory / name / "results.json").read_text())


def table(title: str, results: dict) -> str:
    variants = {v["name"]: v for v in results["variants"]}
    fp32 = variants.get("onnx-fp32")
    rows = [f"\n**{title}** (best: {results.get('best') or 'none'})\n",
            "| variant | size | mean ± std ms | vs onnx-fp32 | argmax agreement | status |", "|---|---|---|---|---|---|"]
    for v in [results["baseline"], *results["variants"]]:
        latency = v.get("latencyMs") or {}
        mean, std = latency.get("mean"), latency.get("std")
        speed = f"{fp32['latencyMs']['mean'] / mean:.2f}×" if mean and fp32 and fp32.get("latencyMs") else "—"
        agreement = (v.get("fidelity") or {}).get("argmaxAgreement")
        status = v["status"] if v["status"] not in ("skipped", "failed") else f"{v['status']}: {(v.get('error') or '')[:90]}"
        timed = f"{mean:.2f} ± {std:.2f}" if mean else "—"
        agree = f"{agreement * 100:.2f}%" if agreement is not None else "—"
        size = f"{v['sizeBytes'] / 1e6:.1f} MB" if v.get("sizeBytes") else "—"
        rows.append(f"| {v['name']} | {size} | {timed} | {speed} | {agree} | {status} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, help="keep the folders and runs here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="64 evaluation items and 20 timed runs")
    args = parser.parse_args()
    directory = args.output or Path(tempfile.mkdtemp(prefix="mlopt-transformers-"))
    directory.mkdir(parents=True, exist_ok=True)
    from optimizer.measure.environment import cpu_info  # after argparse, so --help is fast

    bert, gpt2 = save_models(directory)
    plain = [{"name": r, "recipe": r} for r in RECIPES]
    runs = [
        ("BERT-class encoder, 128 tokens, default export", run(directory, "bert", {"source": "bert"}, plain, args.quick)),
        ("BERT-class encoder, 128 tokens, export.exporter: legacy",
         run(directory, "bert-legacy", {"source": "bert"}, plain, args.quick, {"exporter": "legacy"})),
        ("GPT-2-class LM, 128 tokens (one prompt forward)",
         run(directory, "gpt2-prompt", {"source": "gpt2", "inputs": text_inputs(128, 16000, True)},
             plain + INT4_CHOICES, args.quick)),
        ("GPT-2-class LM, 1 token, no past (the weight-bound part of a decode step)",
         run(directory, "gpt2-token", {"source": "gpt2", "inputs": text_inputs(1, 16000, True)},
             plain + INT4_CHOICES, args.quick)),
    ]
    model, flags = cpu_info()
    print(f"CPU: {model}, flags {' '.join(flags)}; 1 thread; one process per run")
    for title, results in runs:
        print(table(title, results))


if __name__ == "__main__":
    main()
