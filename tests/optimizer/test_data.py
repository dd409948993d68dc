"""Calibration/evaluation data: random, zoo:digits and .npz sources, and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizer.steps.data import DataError, Dataset, load_dataset
from optimizer.zoo.digits_data import digits_split
from optimizer.api.spec import InputSpec

IMAGE = InputSpec(name="image", shape=[1, 1, 8, 8], dynamicAxes={0: "batch"})
TOKENS = InputSpec(name="tokens", shape=[2, 16], dtype="int64", valueRange=[0, 9])


def random_data(samples: int = 10, inputs=(IMAGE, TOKENS)) -> Dataset:
    return load_dataset("random", samples, list(inputs), Path("."))


def items_equal(first: list[dict], second: list[dict]) -> bool:
    return len(first) == len(second) and all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(first, second)
    )


# --- random ---------------------------------------------------------------------------------------

def test_random_is_deterministic_and_evaluation_differs_from_calibration():
    first, second = random_data(), random_data()
    assert items_equal(first.calibration, second.calibration)
    assert items_equal(first.evaluation, second.evaluation)
    assert not np.array_equal(first.calibration[0]["image"], first.evaluation[0]["image"])
    assert first.labels is None


@pytest.mark.parametrize(("samples", "counts"), [(10, (5, 5)), (3, (1, 2)), (2, (1, 1))])
def test_random_splits_samples_half_and_half(samples, counts):
    dataset = random_data(samples)
    assert (len(dataset.calibration), len(dataset.evaluation)) == counts


def test_random_items_have_each_inputs_shape_dtype_and_range():
    dataset = random_data(40)
    for item in dataset.calibration + dataset.evaluation:
        assert item["image"].shape == (1, 1, 8, 8) and item["image"].dtype == np.float32
        assert item["tokens"].shape == (2, 16) and item["tokens"].dtype == np.int64
    images = np.concatenate([item["image"].ravel() for item in dataset.calibration])
    tokens = np.concatenate([item["tokens"].ravel() for item in dataset.calibration])
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert set(np.unique(tokens)) == set(range(10))  # valueRange's high end is included


def test_export_feeds_draw_from_the_same_range_as_the_data():
    from optimizer.engines.feeds import random_feed

    feed = random_feed([TOKENS], {"tokens": [4, 64]})
    assert feed["tokens"].shape == (4, 64) and set(np.unique(feed["tokens"])) == set(range(10))


def test_random_defaults_integers_to_0_100_and_honours_float16():
    half = InputSpec(name="x", shape=[64], dtype="float16", valueRange=[-2, 2])
    ids = InputSpec(name="ids", shape=[512], dtype="int32")
    item = random_data(2, (half, ids)).calibration[0]
    assert item["x"].dtype == np.float16 and -2 <= item["x"].min() and item["x"].max() <= 2
    assert item["x"].min() < 0  # the range really is [-2, 2], not the [0, 1] default
    assert item["ids"].dtype == np.int32 and item["ids"].min() >= 0 and item["ids"].max() <= 100


# --- zoo:digits -----------------------------------------------------------------------------------

def test_digits_split_is_deterministic_and_stratified():
    train_x, test_x, train_y, test_y = digits_split()
    again = digits_split()
    assert np.array_equal(train_x, again[0]) and np.array_equal(test_y, again[3])
    assert len(test_x) == len(test_y) and len(train_x) + len(test_x) == 1797
    assert abs(len(test_x) / 1797 - 0.3) < 0.01
    assert np.all(np.bincount(test_y, minlength=10) > 0)
    assert train_x.dtype == np.float32 and train_x.shape[1:] == (1, 8, 8)
    assert 0.0 <= train_x.min() and train_x.max() <= 1.0


def test_digits_calibrates_on_train_and_evaluates_the_whole_test_split():
    train_x, test_x, _, test_y = digits_split()
    dataset = load_dataset("zoo:digits", 16, [IMAGE], Path("."))
    assert len(dataset.calibration) == 16
    assert np.array_equal(np.concatenate([i["image"] for i in dataset.calibration]), train_x[:16])
    assert len(dataset.evaluation) == len(test_x)
    assert all(item["image"].shape == (1, 1, 8, 8) and item["image"].dtype == np.float32
               for item in dataset.evaluation)
    assert np.array_equal(np.concatenate([i["image"] for i in dataset.evaluation]), test_x)
    assert all(labels.dtype == np.int64 and labels.shape == (1,) for labels in dataset.labels)
    assert np.array_equal(np.concatenate(dataset.labels), test_y)
    assert str(len(test_x)) in dataset.description


def test_digits_batches_follow_the_inputs_batch_size():
    test_count = len(digits_split()[1])
    dynamic = InputSpec(name="image", shape=[4, 1, 8, 8], dynamicAxes={0: "batch"})
    fixed = InputSpec(name="image", shape=[4, 1, 8, 8])
    with_partial = load_dataset("zoo:digits", 8, [dynamic], Path("."))
    full_only = load_dataset("zoo:digits", 8, [fixed], Path("."))
    # A dynamic batch keeps the last, smaller batch; a fixed one must not (the model rejects it).
    assert sum(len(labels) for labels in with_partial.labels) == test_count
    assert sum(len(labels) for labels in full_only.labels) == test_count - test_count % 4
    assert all(item["image"].shape[0] == 4 for item in full_only.evaluation + full_only.calibration)
    assert [len(labels) for labels in with_partial.labels] == [len(i["image"]) for i in with_partial.evaluation]


def test_digits_refuses_models_with_other_inputs():
    with pytest.raises(DataError, match=r"zoo:digits.*\[batch, 1, 8, 8\].*tokens"):
        load_dataset("zoo:digits", 8, [TOKENS], Path("."))


def test_unknown_zoo_dataset_lists_the_available_ones():
    with pytest.raises(DataError, match=r"zoo:imagenet.*available: zoo:digits"):
        load_dataset("zoo:imagenet", 8, [IMAGE], Path("."))


def test_unknown_source_names_the_field_and_the_choices():
    with pytest.raises(DataError, match=r"data.source: is not a data source: use random.*\.npz.*got 'images.csv'"):
        load_dataset("images.csv", 8, [IMAGE], Path("."))


# --- .npz -------------------------------------------------------------------------------------------

WIDE = InputSpec(name="image", shape=[1, 1, 8, 20], dynamicAxes={0: "batch", 3: "width"})


def write_npz(directory: Path, name: str = "data.npz", **arrays) -> str:
    np.savez(directory / name, **arrays)
    return name


def test_npz_splits_first_half_for_calibration_and_second_for_evaluation(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.random((10, 1, 8, 8)), rng.integers(0, 10, 10)
    source = write_npz(tmp_path, image=images, labels=labels)
    dataset = load_dataset(source, 64, [IMAGE], tmp_path)  # relative to base_dir
    assert len(dataset.calibration) == len(dataset.evaluation) == 5
    assert np.array_equal(np.concatenate([i["image"] for i in dataset.calibration]), images[:5].astype(np.float32))
    assert np.array_equal(np.concatenate([i["image"] for i in dataset.evaluation]), images[5:].astype(np.float32))
    assert dataset.calibration[0]["image"].dtype == np.float32  # cast to the input's dtype
    assert [int(l[0]) for l in dataset.labels] == labels[5:].tolist()
    assert all(l.dtype == np.int64 for l in dataset.labels)


def test_npz_samples_caps_calibration_only_and_labels_are_optional(tmp_path):
    source = write_npz(tmp_path, image=np.zeros((20, 1, 8, 8), np.float32))
    dataset = load_dataset(source, 3, [IMAGE], tmp_path)
    assert (len(dataset.calibration), len(dataset.evaluation)) == (3, 10)
    assert dataset.labels is None


def test_npz_allows_other_sizes_along_dynamic_axes(tmp_path):
    source = write_npz(tmp_path, image=np.zeros((4, 1, 8, 48), np.float32))
    dataset = load_dataset(source, 8, [WIDE], tmp_path)
    assert dataset.evaluation[0]["image"].shape == (1, 1, 8, 48)


def test_npz_missing_input_names_the_key_and_expected_shape(tmp_path):
    source = write_npz(tmp_path, pixels=np.zeros((4, 1, 8, 8)))
    with pytest.raises(DataError, match=r"no array 'image' \(found: pixels\).*\['samples', 1, 8, 8\]"):
        load_dataset(source, 8, [IMAGE], tmp_path)


@pytest.mark.parametrize("shape", [(4, 1, 8, 9), (4, 8, 8), (4, 3, 8, 20)])
def test_npz_shape_mismatch_names_the_key_and_expected_shape(tmp_path, shape):
    source = write_npz(tmp_path, image=np.zeros(shape, np.float32))
    spec = IMAGE if shape[-1] != 20 else WIDE
    with pytest.raises(DataError, match=r"'image'.*has shape .*expected \['samples', 1, 8, "):
        load_dataset(source, 8, [spec], tmp_path)


def test_npz_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=r"missing\.npz does not exist.*relative to the spec"):
        load_dataset("missing.npz", 8, [IMAGE], tmp_path)


def test_npz_with_a_pickled_object_array_is_refused(tmp_path):
    objects = np.empty(4, dtype=object)
    objects[:] = [{"code": "would run on load"}] * 4
    source = write_npz(tmp_path, image=np.zeros((4, 1, 8, 8), np.float32), labels=objects)
    with pytest.raises(DataError, match="pickle"):
        load_dataset(source, 8, [IMAGE], tmp_path)


def test_npz_that_is_not_an_archive_is_refused(tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="broken.npz"):
        load_dataset("broken.npz", 8, [IMAGE], tmp_path)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"image": np.zeros((4, 1, 8, 8)), "labels": np.zeros(4)}, r"'labels'.*integers"),
    ({"image": np.zeros((4, 1, 8, 8)), "labels": np.zeros(3, np.int64)}, r"'labels'.*one entry per sample \(4\)"),
    ({"image": np.zeros((1, 1, 8, 8))}, r"1 samples; it needs at least 2"),
])
def test_npz_bad_labels_or_too_few_samples(tmp_path, arrays, message):
    source = write_npz(tmp_path, **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(source, 8, [IMAGE], tmp_path)


def test_npz_refuses_floats_for_an_integer_input(tmp_path):
    tokens = InputSpec(name="tokens", shape=[1, 16], dtype="int64")
    source = write_npz(tmp_path, tokens=np.full((4, 16), 0.5))
    with pytest.raises(DataError, match=r"'tokens'.*float64.*int64"):
        load_dataset(source, 8, [tokens], tmp_path)


def test_npz_inputs_must_agree_on_the_sample_count(tmp_path):
    mask = InputSpec(name="mask", shape=[1, 8])
    source = write_npz(tmp_path, image=np.zeros((4, 1, 8, 8)), mask=np.zeros((6, 8)))
    with pytest.raises(DataError, match=r"disagree on the number of samples"):
        load_dataset(source, 8, [IMAGE, mask], tmp_path)


def test_labelled_sources_keep_calibration_labels_for_qat(tmp_path):
    """QAT fine-tunes on the calibration split, so its labels must travel with it."""
    from optimizer.api.spec import InputSpec

    spec = InputSpec(name="image", shape=[1, 1, 8, 8], dynamicAxes={0: "batch"})
    digits = load_dataset("zoo:digits", 16, [spec], tmp_path)
    assert len(digits.calibration_labels) == len(digits.calibration)
    assert all(lab.shape == (item["image"].shape[0],) for lab, item in zip(digits.calibration_labels, digits.calibration))
    assert load_dataset("random", 8, [spec], tmp_path).calibration_labels is None


def test_a_small_npz_that_decompresses_past_max_size_is_refused_before_loading(tmp_path):
    """data.maxSizeMB bounded only the compressed file: a few KB of zeros could decompress into an OOM kill."""
    from optimizer.api.spec import DataSpec

    np.savez_compressed(tmp_path / "bomb.npz", image=np.zeros((20_000, 1, 8, 8), np.float32))  # 5 MB of zeros
    assert (tmp_path / "bomb.npz").stat().st_size < 2**20 // 10
    with pytest.raises(DataError, match=r"bomb.npz decompresses to 5 MB .*over data.maxSizeMB \(1\)"):
        load_dataset("bomb.npz", 8, [IMAGE], tmp_path, DataSpec(source="bomb.npz", maxSizeMB=1))
    assert load_dataset("bomb.npz", 8, [IMAGE], tmp_path, DataSpec(source="bomb.npz", maxSizeMB=8)).evaluation


def test_an_array_header_that_claims_more_than_max_size_is_refused_before_numpy_allocates_it(tmp_path):
    """numpy allocates the shape a .npy header declares before it reads a byte."""
    import io
    import zipfile

    from optimizer.api.spec import DataSpec

    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 1, 8, 8)})
    member.write(b"\0" * 1024)  # 1 KB where the header promises 256 MB
    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as archive:
        archive.writestr("image.npy", member.getvalue())
    with pytest.raises(DataError, match=r"arrays in liar.npz declare 256 MB in their headers .*over data.maxSizeMB"):
        load_dataset("liar.npz", 8, [IMAGE], tmp_path, DataSpec(source="liar.npz", maxSizeMB=1))


@pytest.mark.parametrize(("acceptance", "per_item", "samples", "items"), [
    ({}, 1, 64, 400),  # the default 1-point budget: one flip is 0.25 points
    ({}, 8, 64, 50),  # 8 decisions per call (a batch of 8, or a sequence of 8 tokens)
    ({}, 32, 64, 32),  # a sequence model has its 400 decisions in the half of samples it always had
    ({"maxAccuracyDrop": 0.2}, 1, 64, 32),  # a loose budget keeps the half of samples it always had
    ({"maxAccuracyDrop": 0.01, "maxRelativeAccuracyDrop": 0.005}, 1, 64, 800),  # the tighter budget decides
    ({"maxAccuracyDrop": 0.0}, 1, 64, 1024),  # no loss allowed at all: the cap
])
def test_the_default_evaluation_split_is_sized_so_one_flip_is_a_quarter_of_the_budget(acceptance, per_item, samples, items):
    from optimizer.api.spec import AcceptanceSpec
    from optimizer.steps.data import evaluation_items

    assert evaluation_items(AcceptanceSpec(**acceptance), per_item, samples) == items
    dataset = load_dataset("random", samples, [InputSpec(name="x", shape=[1, 4])], Path("."), evaluation=items)
    assert (len(dataset.calibration), len(dataset.evaluation)) == (samples // 2, items)


def test_decisions_are_counted_per_argmax_of_the_first_output():
    from optimizer.steps.data import argmax_decisions

    assert argmax_decisions(np.zeros((1, 3))) == 1  # a classifier: one per sample
    assert argmax_decisions(np.zeros((2, 32, 120))) == 64  # a language model: one per token
    assert argmax_decisions(np.zeros((26, 1, 37))) == 26  # a CTC recognizer: one per time step
    assert argmax_decisions(np.float32(0.5)) == 1  # a scalar output is one decision
