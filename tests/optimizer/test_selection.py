"""Selection rules users rely on: the budget is enforced, slow variants are flagged and never best."""

from __future__ import annotations

from optimizer.results import Latency, VariantResult
from optimizer.selection import apply_budget, flag_slow_variants, pick_best


def variant(name, recipe, mean, accuracy=1.0, runtime="onnxruntime", ops=None, size=1_000_000):
    lat = Latency(mean=mean, std=0.1, p50=mean, p90=mean, p99=mean, runs=10)
    return VariantResult(name=name, recipe=recipe, status="ok", runtime=runtime, latencyMs=lat, accuracy=accuracy,
                         sizeBytes=size, opCounts=ops or {}, speedup=None)


def with_speedups(baseline, variants):
    for v in variants:
        v.speedup = baseline.latencyMs.mean / v.latencyMs.mean
    return variants


def test_fastest_within_budget_wins_and_over_budget_is_rejected():
    baseline = variant("pytorch-fp32", "pytorch-fp32", 20.0, accuracy=0.98, runtime="pytorch")
    fast_but_wrong = variant("ort-int8-static", "ort-int8-static", 4.0, accuracy=0.90)
    good = variant("ort-int8-dynamic", "ort-int8-dynamic", 8.0, accuracy=0.975)
    variants = with_speedups(baseline, [fast_but_wrong, good])
    for v in variants:
        apply_budget(v, baseline, 0.01, "top1")
    assert fast_but_wrong.status == "rejected" and "8.00 points below" in fast_but_wrong.error
    assert good.status == "ok"
    best, reason = pick_best(variants, baseline)
    assert best == "ort-int8-dynamic" and "2.50x" in reason


def test_variant_slower_than_baseline_is_never_best_and_is_explained():
    baseline = variant("pytorch-fp32", "pytorch-fp32", 10.0, runtime="pytorch")
    fp32 = variant("onnx-fp32", "onnx-fp32", 12.0)
    dyn = variant("ort-int8-dynamic", "ort-int8-dynamic", 30.0, ops={"ConvInteger": 7, "DynamicQuantizeLinear": 7})
    variants = with_speedups(baseline, [fp32, dyn])
    flag_slow_variants(variants, baseline, ["avx512_vnni"])
    assert any("ConvInteger ×7" in n for n in dyn.notes)
    assert any(n.startswith("SLOWER") for n in fp32.notes)
    best, reason = pick_best(variants, baseline)
    assert best is None and "faster than the PyTorch FP32 baseline" in reason


def test_missing_vnni_is_named_as_the_reason():
    baseline = variant("pytorch-fp32", "pytorch-fp32", 10.0, runtime="pytorch")
    fp32 = variant("onnx-fp32", "onnx-fp32", 5.0)
    static = variant("ort-int8-static", "ort-int8-static", 6.0, ops={"QLinearConv": 3})
    flag_slow_variants(with_speedups(baseline, [fp32, static]), baseline, ["avx2", "fma"])
    assert any("no VNNI" in n for n in static.notes)
    assert not fp32.notes
