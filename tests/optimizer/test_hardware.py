"""The hardware profile table: which quantization choices follow from which CPU, on any machine."""

from __future__ import annotations

import pytest

from optimizer.measure.hardware import isa_class, resolve

AVX2_EPYC = ["avx2", "fma", "f16c"]  # AMD Zen 3
ZEN4 = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"]
SAPPHIRE_RAPIDS = [*ZEN4, "amx_tile", "amx_int8", "amx_bf16"]
SKYLAKE_SP = ["avx2", "fma", "f16c", "avx512f", "avx512bw"]
ALDER_LAKE = ["avx2", "fma", "f16c", "avx_vnni"]


@pytest.mark.parametrize("flags, isa, reduce_range", [
    (AVX2_EPYC, "avx2", True),
    (SKYLAKE_SP, "avx512", True),
    (ALDER_LAKE, "avx-vnni", False),
    (ZEN4, "avx512-vnni", False),
    (SAPPHIRE_RAPIDS, "amx", False),
])
def test_each_cpu_class_gets_its_quantization_choices(flags, isa, reduce_range):
    profile = resolve("auto", flags)
    assert (isa_class(flags), profile.isa, profile.reduce_range, profile.chosen_by) == (isa, isa, reduce_range, "detected")
    assert ("reduce_range" in profile.reasons[-1]) == reduce_range
    # NNCF's 7-bit switch (OverflowFix) follows ORT's: openvino-int8 must not saturate where ORT's INT8 would.
    assert profile.overflow_fix == ("enable" if reduce_range else "disable")


def test_benchmark_profile_targets_other_nodes_and_says_so():
    profile = resolve("avx2", SAPPHIRE_RAPIDS)
    assert profile.isa == "avx2" and profile.detected == "amx" and profile.reduce_range
    assert profile.record()["chosenBy"] == "benchmark.profile"
    assert "timings are of this machine" in profile.reasons[0]
    assert not resolve("amx", AVX2_EPYC).reduce_range


def test_only_amx_adds_openvino_to_the_default_set():
    assert resolve("auto", SAPPHIRE_RAPIDS).default_extras == ("openvino-ort-qdq", "openvino-default")
    assert all(resolve("auto", flags).default_extras == () for flags in (AVX2_EPYC, SKYLAKE_SP, ZEN4, ALDER_LAKE))


def test_cuda_keeps_full_range_weights():
    assert resolve("auto", AVX2_EPYC, "cuda").isa == "cuda" and not resolve("auto", AVX2_EPYC, "cuda").reduce_range
