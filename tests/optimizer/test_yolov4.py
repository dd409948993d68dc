"""zoo:yolov4: the research note's detector, layer for layer, with its decode inside the model.

A small input (128×128, the model takes any multiple of 32) keeps these quick; the export tests
are slow (a 257 MB graph: 15-60 s per exporter on a busy 2-core machine).
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from optimizer.zoo import ZOO, yolov4

SMALL = 128  # grids 16², 8², 4²: 3 × 336 candidates


@pytest.fixture(scope="module")
def model() -> yolov4.YOLOv4:
    return yolov4.build()


def image(size: int = SMALL, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_it_is_yolov4_as_published():
    """64,363,101 parameters (the public PyTorch port's count), ≈ 257 MB FP32; 110 convs, 72 of them
    followed by Mish (the backbone), SPP's 5/9/13 pools, three 255-channel heads at strides 8/16/32."""
    fresh = yolov4.YOLOv4()
    assert yolov4.parameter_count(fresh) == 64_363_101
    state_bytes = sum(t.numel() * t.element_size() for t in fresh.state_dict().values())
    assert 257e6 < state_bytes < 258.5e6
    convs = [m for m in fresh.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 110
    assert sum(isinstance(m, torch.nn.Mish) for m in fresh.modules()) == 72
    assert sum(isinstance(m, torch.nn.Mish) for m in fresh.backbone.modules()) == 72
    assert sorted(p.kernel_size for p in fresh.neck.spp.pools) == [5, 9, 13]
    assert [head.predict.out_channels for head in fresh.heads] == [255, 255, 255]
    fresh.decode = False
    with torch.no_grad():
        raw = fresh.eval()(image())
    assert [tuple(x.shape) for x in raw] == [(1, 255, 16, 16), (1, 255, 8, 8), (1, 255, 4, 4)]


def test_the_zoo_entry_declares_a_detector_that_fits_two_cores():
    entry = ZOO["yolov4"]
    assert entry.inputs[0].shape == [1, 3, 320, 320] and entry.inputs[0].dynamicAxes == {0: "batch"}


def _decode_by_hand(raw: np.ndarray, stride: int, anchors, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """YOLOv4's decode written out per cell, independently of the model's vectorized one."""
    _, _, height, width = raw.shape
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    boxes, scores = [], []
    grid = raw[0].reshape(3, 85, height, width)
    for anchor in range(3):
        for row in range(height):
            for column in range(width):
                t = grid[anchor, :, row, column]
                cx = (sigmoid(t[0]) * scale - (scale - 1) / 2 + column) * stride
                cy = (sigmoid(t[1]) * scale - (scale - 1) / 2 + row) * stride
                w, h = np.exp(t[2]) * anchors[anchor][0], np.exp(t[3]) * anchors[anchor][1]
                boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
                scores.append(sigmoid(t[4]) * sigmoid(t[5:]))
    return np.array(boxes), np.array(scores)


def test_decode_inside_the_model_is_yolov4s_decode(model):
    with torch.no_grad():
        boxes, scores = (t.numpy() for t in model(image()))
        model.decode = False
        try:
            raw = [t.numpy() for t in model(image())]
        finally:
            model.decode = True
    assert boxes.shape == (1, 3 * (16 * 16 + 8 * 8 + 4 * 4), 4) and scores.shape == (1, boxes.shape[1], 80)
    expected_boxes, expected_scores = zip(*(
        _decode_by_hand(raw[i], yolov4.STRIDES[i], yolov4.ANCHORS[3 * i:3 * i + 3], yolov4.SCALE_XY[i]) for i in range(3)))
    np.testing.assert_allclose(boxes[0], np.concatenate(expected_boxes), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scores[0], np.concatenate(expected_scores), rtol=1e-4, atol=1e-6)


def test_random_weights_make_a_detectors_number_of_detections(model):
    """Objectness is set so that the seeded model proposes a handful of boxes per image, not hundreds."""
    with torch.no_grad():
        _, scores = model(image(320, seed=7))
    confident = int((scores.amax(dim=-1) >= yolov4.SCORE_THRESHOLD).sum())
    assert 3 <= confident <= 100


def test_random_weights_are_conditioned_like_a_trained_detectors(model):
    """Boxes stay anchor-sized (the unconditioned seeded model drew boxes 10^7 pixels wide) and BF16
    rounding moves the head logits by a few percent, not by their whole spread (it moved them 55-80%
    and reshuffled every detection): the INT8 and BF16 variants have something to agree with."""
    import copy

    with torch.no_grad():
        boxes, _ = model(image(yolov4.SIZE, seed=7))
        model.decode = False
        try:
            exact = model(image(yolov4.SIZE, seed=7))
            rounded = copy.deepcopy(model).to(torch.bfloat16)(image(yolov4.SIZE, seed=7).bfloat16())
        finally:
            model.decode = True
    assert float(boxes.abs().max()) < 3000
    for fp32, bf16 in zip(exact, rounded):
        assert float((bf16.float() - fp32).std() / fp32.std()) < 0.15


def test_the_yolo_loss_targets_decode_back_to_the_labelled_boxes():
    """The training targets (zoo:shapes-detector's YOLO loss, per head with Darknet's scale_x_y) are
    the raw values YOLOv4's decode turns back into each labelled box, at the head of its best anchor."""
    from optimizer.zoo.shapes_detector import _targets
    from optimizer.zoo.yolo_decode import decode

    boxes = np.array([[[30.0, 40.0, 72.0, 82.0], [100.0, 150.0, 220.0, 270.0], [0, 0, 0, 0]]], np.float32)
    labels = np.array([[2, 0, -1]])
    found = []
    for index, stride in enumerate(yolov4.STRIDES):
        grid, anchors = yolov4.SIZE // stride, torch.tensor(yolov4.ANCHORS[3 * index:3 * index + 3], dtype=torch.float32)
        targets = _targets(boxes, labels, grid, stride, yolov4.ANCHORS, index, yolov4.SCALE_XY[index])
        raw = torch.zeros(1, 3, grid, grid, 85)
        raw[..., 0:2] = torch.logit(targets["offset"].clamp(1e-6, 1 - 1e-6))
        raw[..., 2:4] = targets["log_size"]
        decoded, _ = decode(raw.permute(0, 1, 4, 2, 3).reshape(1, 255, grid, grid), anchors, stride, 80,
                            yolov4.SCALE_XY[index])
        found += [(index, box) for box in decoded[0][targets["assigned"].reshape(-1)].tolist()]
    assert [index for index, _ in found] == [0, 2]  # 42 px: (40, 28) at stride 8; 120 px: (142, 110) at 32
    np.testing.assert_allclose([box for _, box in found], boxes[0, :2], atol=1e-3)


def test_zoo_shapes_renders_labelled_scenes_at_yolov4s_input_size():
    """data.source zoo:shapes at a 320×320 input: the shapes scaled to it (40-140 px, YOLOv4's
    anchors at all three strides) and 32 evaluation scenes; at 128, zoo:shapes-detector's scenes."""
    from optimizer.api.spec import InputSpec
    from optimizer.steps.data import DataError, _shapes
    from optimizer.zoo import shapes

    dataset = _shapes(8, [InputSpec(name="image", shape=[1, 3, 320, 320], dtype="float32")])
    assert len(dataset.calibration) == 8 and len(dataset.evaluation) == 32
    assert dataset.evaluation[0]["image"].shape == (1, 3, 320, 320)
    boxes = np.concatenate(dataset.boxes)[np.concatenate(dataset.labels) >= 0]
    sides = boxes[:, 2] - boxes[:, 0]
    assert 40 <= sides.min() and sides.max() <= 140 and 0 <= boxes.min() and boxes.max() <= 320
    small, small_boxes, _ = shapes.render(4, shapes.SEEDS["evaluation"])
    assert small.shape == (4, 3, 128, 128) and 16 <= (small_boxes[..., 2] - small_boxes[..., 0]).max() <= 56
    with pytest.raises(DataError, match=r"\[batch, 3, 128, 128\]"):
        _shapes(8, [InputSpec(name="image", shape=[1, 3, 320, 256], dtype="float32")])


def _export(model, path, dynamo: bool) -> Counter:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (image(),), str(path), input_names=["image"], output_names=["boxes", "scores"],
                          dynamo=dynamo, opset_version=18, external_data=False)
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def _onnx_matches_pytorch(model, path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = [t.numpy() for t in model(image(seed=3))]
    actual = session.run(None, {"image": image(seed=3).numpy()})
    # A box edge near 0 is the difference of two large numbers (centre − half a 1,000-pixel anchor
    # box): compare boxes to their scale, not each element's; scores below 1e-5 never make a detection.
    boxes, scores = expected
    np.testing.assert_allclose(actual[0], boxes, rtol=1e-3, atol=1e-4 * float(np.abs(boxes).max()))
    np.testing.assert_allclose(actual[1], scores, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_legacy_exporter_writes_mish_as_softplus_tanh_mul(model, tmp_path):
    ops = _export(model, tmp_path / "legacy.onnx", dynamo=False)
    assert ops["Softplus"] == ops["Tanh"] == 72 and "Mish" not in ops
    assert (tmp_path / "legacy.onnx").stat().st_size > 245e6
    _onnx_matches_pytorch(model, tmp_path / "legacy.onnx")


@pytest.mark.slow
def test_dynamo_exporter_writes_the_opset_18_mish_op(model, tmp_path):
    ops = _export(model, tmp_path / "dynamo.onnx", dynamo=True)
    assert ops["Mish"] == 72 and "Softplus" not in ops
    _onnx_matches_pytorch(model, tmp_path / "dynamo.onnx")
