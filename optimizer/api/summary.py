"""The worker's compact summary: what the operator turns into status.

Kubernetes keeps at most 4096 bytes of a container's termination message, so the summary is
a trimmed projection of results.json that always fits; the full results stay in the output dir.
Torch-free: the operator parses it.
"""

from __future__ import annotations

import json
from typing import Any

from optimizer.api.results import Results, VariantResult, baseline_label
from optimizer.api.units import format_size

MAX_BYTES = 4096
SUMMARY_VERSION = 1


def _variant_entry(variant: VariantResult) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": variant.name, "recipe": variant.recipe, "status": variant.status}
    if variant.sizeBytes is not None:
        entry["sizeBytes"] = variant.sizeBytes
    if variant.latencyMs is not None:
        entry["latencyMs"] = {
            "p50": round(variant.latencyMs.p50, 3),
            "mean": round(variant.latencyMs.mean, 3),
        }
    if variant.speedup is not None:
        entry["speedup"] = round(variant.speedup, 2)
    if variant.accuracy is not None:
        entry["accuracy"] = round(variant.accuracy, 4)
    if variant.fidelity is not None:
        entry["argmaxAgreement"] = round(variant.fidelity.argmaxAgreement, 4)
    if variant.error:
        entry["error"] = variant.error[:160]
    return entry


def _serving_entry(results: Results) -> dict[str, Any] | None:
    """The serving sweep's figure at the SLO (what the operator's per-target row shows and prices)."""
    serving = results.serving
    if serving is None:
        return None
    return {"variant": serving.variant,
            "requestsPerSecond": None if serving.requestsPerSecond is None else round(serving.requestsPerSecond, 1),
            "p99Ms": None if serving.p99Ms is None else round(serving.p99Ms, 2),
            "latencySLOMs": serving.latencySLOMs, "reason": serving.reason and serving.reason[:240]}


def _fit(summary: dict[str, Any]) -> str:
    """Drop detail, least important first, until the JSON fits the termination message."""
    text = json.dumps(summary, separators=(",", ":"))
    for variant in summary.get("variants", []):
        if len(text.encode()) <= MAX_BYTES:
            break
        variant.pop("error", None)
        text = json.dumps(summary, separators=(",", ":"))
    # Then whole variants, from the end, the best one never: status must always show what was picked.
    droppable = [v for v in summary.get("variants", []) if v.get("name") != summary.get("best")]
    while len(text.encode()) > MAX_BYTES and droppable:
        summary["variants"].remove(droppable.pop())
        summary["truncated"] = True
        text = json.dumps(summary, separators=(",", ":"))
    if len(text.encode()) > MAX_BYTES:
        summary["message"] = summary.get("message", "")[:200]
        text = json.dumps(summary, separators=(",", ":"))
    return text


def _artifacts(results: Results, location: str) -> dict[str, Any]:
    """The best model's stored location, size and sha256 (from results.outputs)."""
    if not results.best or not location.endswith("results.json"):
        return {}
    best = results.variant(results.best) if results.best != results.baseline.name else results.baseline
    record = next((o for o in results.outputs if o["path"] == best.artifact), None)
    if record is None:
        return {}
    base = location.removesuffix("results.json")
    return {"best": {"uri": base + record["path"], "sizeBytes": record["sizeBytes"], "sha256": record["sha256"]}}


def success_summary(results: Results, location: str, output: str | None = None) -> str:
    """output: where the run was stored (None: nowhere durable, said in the message)."""
    best = results.variant(results.best) if results.best else None
    message = (
        f"best {best.name}: {best.speedup:.2f}x faster than {baseline_label(results.baseline)}, "
        f"{format_size(best.sizeBytes)}"
        if best and best.speedup and best.sizeBytes
        else results.bestReason
    )
    if output is None:
        message += "; nothing was kept: set spec.output (s3://bucket/prefix/ or pvc://claim/path/) to keep the models"
    summary = {
        "v": SUMMARY_VERSION,
        "phase": "Succeeded",
        "message": message[:400],
        "best": results.best,
        "baseline": _variant_entry(results.baseline),
        "variants": [_variant_entry(v) for v in results.variants],
        "output": output or "not kept (no spec.output)",
        "target": results.target,  # spec.targets' name this run measured; None: wherever the Job ran
        "serving": _serving_entry(results),  # never dropped by _fit: a few hundred bytes at most
    }
    if output is not None:
        summary.update(results=location, artifacts=_artifacts(results, location))
    return _fit(summary)


def failure_summary(reason: str, message: str) -> str:
    return _fit({"v": SUMMARY_VERSION, "phase": "Failed", "reason": reason, "message": message[:3000]})


def parse_summary(text: str) -> dict[str, Any] | None:
    """The summary a worker wrote, or None when the text is not one (e.g. a crash's log tail)."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("v") != SUMMARY_VERSION:
        return None
    return data
