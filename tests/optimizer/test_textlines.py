"""Synthetic text lines, the zoo:textlines data set and the crnn-ocr model's train-once cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizer.steps.data import TEXTLINES_EVALUATION, DataError, load_dataset
from optimizer.api.spec import InputSpec
from optimizer.zoo import textlines
from optimizer.zoo.textlines import ALPHABET, PAD, decode, decode_greedy, encode, render_batch


def test_the_alphabet_and_the_blank_fill_the_crnns_42_outputs():
    assert len(ALPHABET) == 41 and len(set(ALPHABET)) == 41
    assert textlines.NUM_CLASSES == 42 and textlines.BLANK == 0
    assert encode(ALPHABET) == list(range(1, 42))


def test_encode_decode_round_trip():
    for text in ["abc", "0x5ti", "a-b.c:d/#", "zz9"]:
        assert decode(encode(text)) == text
    assert decode([0, 1, PAD, 2]) == "01"  # blank and padding are skipped
    with pytest.raises(ValueError, match="outside the alphabet"):
        encode("ABC")


def _logits(path: list[int], classes: int = 42) -> np.ndarray:
    """(time, 1, classes) scores whose argmax follows `path`."""
    scores = np.zeros((len(path), 1, classes), dtype=np.float32)
    scores[np.arange(len(path)), 0, path] = 1.0
    return scores


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    a, b = encode("a")[0], encode("b")[0]
    assert decode_greedy(_logits([0, a, a, 0, a, b, b, 0])) == ["aab"]
    assert decode_greedy(_logits([0, 0, 0])) == [""]
    batch = np.concatenate([_logits([a, 0, b]), _logits([b, b, b])], axis=1)
    assert decode_greedy(batch) == ["ab", "b"]


def test_render_batch_shape_range_labels_and_determinism():
    images, labels = render_batch(12, seed=5)
    assert images.shape == (12, 1, 32, 100) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.05
    assert labels.shape == (12, textlines.MAX_LENGTH) and labels.dtype == np.int64
    lengths = (labels != PAD).sum(axis=1)
    assert ((lengths >= 3) & (lengths <= 8)).all()
    assert ((labels == PAD) | ((labels >= 1) & (labels <= 41))).all()
    for row, length in zip(labels, lengths):
        assert (row[length:] == PAD).all()  # padding only at the end

    again_images, again_labels = render_batch(12, seed=5)
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(labels, again_labels)
    prefix_images, _ = render_batch(4, seed=5)  # sample i depends only on (seed, i)
    np.testing.assert_array_equal(prefix_images, images[:4])

    other_images, other_labels = render_batch(12, seed=6)
    assert not np.array_equal(images, other_images) and not np.array_equal(labels, other_labels)


def test_the_data_splits_use_different_seeds():
    assert len(set(textlines.SEEDS.values())) == len(textlines.SEEDS)


# --- zoo:textlines -----------------------------------------------------------------------------

def _line_input(batch: int = 1, dynamic: bool = True) -> InputSpec:
    return InputSpec(name="image", shape=[batch, 1, 32, 100], dtype="float32",
                     dynamicAxes={0: "batch", 3: "width"} if dynamic else {})


def test_textlines_dataset_items_and_labels():
    dataset = load_dataset("zoo:textlines", 6, [_line_input(batch=4)], Path("."))
    assert [item["image"].shape[0] for item in dataset.calibration] == [4, 2]  # samples 6, dynamic batch
    assert sum(len(item["image"]) for item in dataset.evaluation) == TEXTLINES_EVALUATION
    assert len(dataset.labels) == len(dataset.evaluation)
    for item, labels in zip(dataset.evaluation, dataset.labels):
        assert labels.dtype == np.int64 and labels.shape == (len(item["image"]), textlines.MAX_LENGTH)
    # evaluation lines are not calibration lines
    assert not np.array_equal(dataset.calibration[0]["image"], dataset.evaluation[0]["image"])
    assert "text lines" in dataset.description


def test_textlines_dataset_refuses_other_input_shapes():
    with pytest.raises(DataError, match=r"zoo:textlines gives one input of shape \[batch, 1, 32, 100\]"):
        load_dataset("zoo:textlines", 4, [InputSpec(name="image", shape=[1, 1, 8, 8], dtype="float32")], Path("."))


def test_npz_accepts_padded_label_sequences(tmp_path):
    images, labels = render_batch(8, seed=3)
    np.savez(tmp_path / "lines.npz", image=images, labels=labels)
    dataset = load_dataset("lines.npz", 4, [_line_input(batch=2)], tmp_path)
    np.testing.assert_array_equal(np.concatenate(dataset.labels), labels[4:])


# --- zoo:crnn-ocr: trained once, then loaded --------------------------------------------------

def test_crnn_ocr_trains_into_the_cache_once_then_loads(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from optimizer.zoo import ZOO, crnn_ocr

    monkeypatch.setenv("MLOPT_CACHE", str(tmp_path))
    monkeypatch.setenv("MLOPT_CRNN_OCR_STEPS", "3")
    model = ZOO["crnn-ocr"].build()
    assert not model.training
    path = crnn_ocr.cache_path()
    assert path == tmp_path / "zoo" / f"crnn-ocr-{crnn_ocr.VERSION}-3.safetensors"
    stored = load_file(str(path))
    assert all(torch.equal(stored[key], value) for key, value in model.state_dict().items())
    assert not list(path.parent.glob("*.partial"))

    def no_training(*args, **kwargs):
        raise AssertionError("the second build trained instead of loading the cache")

    monkeypatch.setattr(crnn_ocr, "train", no_training)
    reloaded = ZOO["crnn-ocr"].build()
    assert all(torch.equal(stored[key], value) for key, value in reloaded.state_dict().items())
    with torch.no_grad():
        assert tuple(reloaded(torch.from_numpy(render_batch(2, seed=0)[0])).shape) == (24, 2, 42)


def test_crnn_ocr_is_the_crnn_architecture():
    from optimizer.zoo import crnn, crnn_ocr

    assert crnn_ocr.CRNN is crnn.CRNN


@pytest.mark.parametrize("step_count", [1, 2, 3, 10, 3000])
def test_crnn_ocr_learning_rate_warms_up_then_decays_for_any_step_count(step_count):
    from optimizer.zoo.weights import warmup_cosine

    factors = [warmup_cosine(step_count)(step) for step in range(step_count)]
    assert all(0.0 <= factor <= 1.0 for factor in factors)
    assert max(factors) == 1.0
    peak = factors.index(1.0)
    assert factors[peak:] == sorted(factors[peak:], reverse=True)
