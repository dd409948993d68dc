"""Selection rules users rely on: the budget is enforced, slow variants are flagged and never best."""

from __future__ import annotations

from optimizer.api.results import Latency, VariantResult
from optimizer.steps.select import apply_budget, flag_slow_variants, pick_best


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
    assert best is None and "faster than the baseline (PyTorch FP32)" in reason


def test_the_reason_names_the_real_baseline_a_users_onnx_in_onnx_runtime():
    source = variant("onnx-source-fp32", "onnx-source", 10.0)
    fp32 = variant("onnx-fp32", "onnx-fp32", 5.0)
    best, reason = pick_best(with_speedups(source, [fp32]), source)
    assert best == "onnx-fp32" and "2.00x faster than your ONNX model in ONNX Runtime (FP32)" in reason
    assert "PyTorch" not in reason


def test_missing_vnni_is_named_as_the_reason():
    baseline = variant("pytorch-fp32", "pytorch-fp32", 10.0, runtime="pytorch")
    fp32 = variant("onnx-fp32", "onnx-fp32", 5.0)
    static = variant("ort-int8-static", "ort-int8-static", 6.0, ops={"QLinearConv": 3})
    flag_slow_variants(with_speedups(baseline, [fp32, static]), baseline, ["avx2", "fma"])
    assert any("no VNNI" in n for n in static.notes)
    assert not fp32.notes


def test_absolute_and_relative_budgets_must_both_hold_and_the_message_says_which():
    from optimizer.steps.select import budget_failure

    assert budget_failure(0.95, 0.96, 0.02, 0.02, "top1") is None
    relative_only = budget_failure(0.45, 0.50, 0.10, 0.05, "top1")  # 5 points, but 10% of FP32's 0.50
    assert "maxRelativeAccuracyDrop" in relative_only and "10.00% below" in relative_only
    assert "maxAccuracyDrop" not in relative_only
    both = budget_failure(0.40, 0.50, 0.05, 0.05, "char-accuracy")
    assert both.startswith("char-accuracy 0.4000 is 10.00 points below") and "20.00% below" in both
    baseline = variant("pytorch-fp32", "pytorch-fp32", 10.0, accuracy=0.50)
    v = variant("ort-int8-static", "ort-int8-static", 5.0, accuracy=0.45)
    apply_budget(v, baseline, 0.10, "top1", 0.05)
    assert v.status == "rejected" and "relative" in v.error


def test_metric_resolution():
    import pytest

    from optimizer.api.errors import DataLoadError
    from optimizer.steps.select import resolve_metric

    assert resolve_metric("auto", "top1", True, "zoo:digits") == "top1"
    assert resolve_metric("auto", "char-accuracy", True, "zoo:textlines") == "char-accuracy"
    assert resolve_metric("auto", "agreement", True, "data.npz") == "top1"  # user model, labelled data
    assert resolve_metric("auto", "top1", False, "random") == "agreement"
    assert resolve_metric("agreement", "top1", True, "zoo:digits") == "agreement"
    with pytest.raises(DataLoadError, match="acceptance.metric exact-match needs labels, but data.source random"):
        resolve_metric("exact-match", "agreement", False, "random")


def test_differences_within_noise_are_not_flagged():
    baseline = variant("pytorch-fp32", "pytorch-fp32", 10.0, runtime="pytorch")
    fp32 = variant("onnx-fp32", "onnx-fp32", 5.0)
    level = variant("ort-int8-dynamic", "ort-int8-dynamic", 5.05)  # 1% slower: noise
    flag_slow_variants(with_speedups(baseline, [fp32, level]), baseline, ["avx512_vnni"])
    assert not level.notes


def test_metric_must_fit_the_labels():
    import pytest

    from optimizer.steps.select import MetricError, resolve_metric

    assert resolve_metric("auto", "agreement", True, "lines.npz", sequence_labels=True) == "char-accuracy"
    assert resolve_metric("auto", "agreement", True, "digits.npz") == "top1"
    assert resolve_metric("auto", "char-accuracy", True, "zoo:textlines", sequence_labels=True) == "char-accuracy"
    with pytest.raises(MetricError, match="use char-accuracy or exact-match"):
        resolve_metric("top1", "agreement", True, "lines.npz", sequence_labels=True)
    with pytest.raises(MetricError, match="use top1"):
        resolve_metric("exact-match", "agreement", True, "digits.npz")
