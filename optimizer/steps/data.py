"""The data step: calibration items for static INT8 and held-out evaluation items (with labels if any).

An item is one model call's inputs: input name → array with the InputSpec's shape, so a batch of
shape[0] samples. Sources (`data.source`):
- `random`: seeded values in each input's valueRange; `samples` items, half calibration, half
  evaluation (different seeds); no labels. When the spec leaves data.samples unset, the evaluation
  half is sized from the accuracy budget instead (evaluation_items: one flip ≤ a quarter of it;
  not for detectors or a zoo model that sets its own count).
- `zoo:digits`: scikit-learn's bundled digits (8×8 grey images, 10 classes); calibration from the
  training split, evaluation on the whole test split so accuracy means something.
- `zoo:textlines`: synthetic text lines ([batch, 1, 32, 100], optimizer/zoo/textlines.py) with
  padded label sequences; calibration and evaluation rendered from different seeds, neither the
  seed zoo:crnn-ocr trained on.
- `zoo:shapes`: synthetic scenes of circles, squares and triangles ([batch, 3, 128, 128], or any
  square side 64-1024 with the shapes scaled to it, e.g. zoo:yolov4's 320; optimizer/zoo/shapes.py)
  with labelled boxes; calibration and evaluation from different seeds (128 evaluation scenes at
  128, 32 at larger sides).
- `<file>.npz` (relative to the spec's directory): one array per input name, first axis =
  samples, optional integer `labels` (one per sample, or [samples, length] padded sequences);
  for a detector, labelled boxes: `boxes` [samples, max_boxes, 4] (in model.detection.boxFormat)
  and `labels` [samples, max_boxes] class ids, -1 for padding rows. First half calibration,
  second half evaluation.
For the labelled sources `samples` caps the calibration samples: calibration cost grows with it,
while evaluation should use every held-out sample.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optimizer.api import uris
from optimizer.api.errors import DataLoadError
from optimizer.api.spec import DataSpec, InputSpec
from optimizer.engines.feeds import numpy_dtype, random_value
from optimizer.steps.run import Run
from optimizer.zoo.digits_data import DIGITS_SHAPE, digits_split

RANDOM_SEEDS = {"calibration": 0, "evaluation": 1}
TEXTLINES_SHAPE = (1, 32, 100)  # per sample: one grey channel, height 32, width 100
TEXTLINES_EVALUATION = 256  # held-out lines: CER on 256 lines (~1,400 characters) moves in 0.07% steps


DataError = DataLoadError  # the name the data step's callers and tests use


@dataclass
class Dataset:
    calibration: list[dict[str, np.ndarray]]
    evaluation: list[dict[str, np.ndarray]]  # held out from calibration
    labels: list[np.ndarray] | None  # per evaluation item, the int64 labels of its batch
    description: str
    calibration_labels: list[np.ndarray] | None = None  # per calibration item (QAT fine-tunes on them)
    boxes: list[np.ndarray] | None = None  # detectors: per evaluation item, [batch, max_boxes, 4]; `labels` are their classes
    sized_from_budget: bool = False  # the evaluation split was sized from the accuracy budget (evaluation_items)


def load_dataset(source: str, samples: int, inputs: Sequence[InputSpec], base_dir: Path, spec=None,
                 storage=None, evaluation: int | None = None) -> Dataset:
    """spec: the DataSpec (size limit and sha256 pin for files); storage: spec.storage, for s3://;
    evaluation: the random source's held-out items, when sized from the accuracy budget."""
    if source == "random":
        return _random(samples, inputs, evaluation)
    if source.startswith("zoo:"):
        return _zoo(source.removeprefix("zoo:"), samples, inputs)
    from optimizer.artifacts.storage import StorageError, fetch

    try:  # the spec checked it already; a caller that built no spec gets the same rule
        uris.data_source(source)
    except uris.UriError as error:
        raise DataError(f"data.source: {error} (got {source!r})") from None
    limits = spec or DataSpec(source=source)  # maxSizeMB and sha256 as the spec (or its defaults) say
    max_bytes = limits.maxSizeMB * 2**20
    if "://" not in source and not (Path(base_dir) / source).is_file():
        return _npz(Path(base_dir) / source, samples, inputs, max_bytes)  # says where it looked and how to fix it
    try:
        path = fetch(source, "data.source", Path(base_dir), max_bytes=max_bytes, sha256=limits.sha256,
                     pin_field="data.sha256", storage=storage)
    except StorageError as error:  # status.reason DataLoadFailed
        raise DataError(str(error)) from None
    return _npz(path, samples, inputs, max_bytes)


# --- random -----------------------------------------------------------------------------------

def _random_items(count: int, inputs: Sequence[InputSpec], seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{spec.name: random_value(spec, rng) for spec in inputs} for _ in range(count)]


def _random(samples: int, inputs: Sequence[InputSpec], evaluation: int | None = None) -> Dataset:
    """`evaluation`: items held out, when sized from the accuracy budget (evaluation_items); else half of samples."""
    calibration_count = max(1, samples // 2)
    evaluation_count = evaluation or max(1, samples - calibration_count)
    return Dataset(
        calibration=_random_items(calibration_count, inputs, RANDOM_SEEDS["calibration"]),
        evaluation=_random_items(evaluation_count, inputs, RANDOM_SEEDS["evaluation"]),
        labels=None,
        description=f"random inputs (seeded), {calibration_count} calibration and "
        f"{evaluation_count} evaluation items",
    )


# --- batching shared by the labelled sources ----------------------------------------------------

def _batches(arrays: dict[str, np.ndarray], batch: int, partial_ok: bool) -> list[dict[str, np.ndarray]]:
    """Cut sample arrays (first axis = samples) into items of `batch` samples.

    A last, smaller batch is kept only when the batch axis is dynamic: a model exported with a
    fixed batch would reject it.
    """
    count = len(next(iter(arrays.values())))
    stops = range(batch, count + (batch - 1 if partial_ok else 0) + 1, batch)
    return [{name: array[stop - batch:stop] for name, array in arrays.items()} for stop in stops]


def _batch_size(spec: InputSpec) -> tuple[int, bool]:
    return spec.shape[0], 0 in spec.dynamicAxes


def _labelled(calibration: dict[str, np.ndarray], evaluation: dict[str, np.ndarray], labels: np.ndarray | None,
              samples: int, inputs: Sequence[InputSpec], description: str,
              calibration_labels: np.ndarray | None = None, boxes: np.ndarray | None = None) -> Dataset:
    """Items from sample arrays: at most `samples` (but one full batch) calibrate, all of evaluation."""
    batch, partial_ok = _batch_size(inputs[0])
    calibration_items = _batches({name: array[:max(samples, batch)] for name, array in calibration.items()},
                                 batch, partial_ok)
    evaluation_items = _batches(evaluation, batch, partial_ok)

    def label_items(array: np.ndarray | None, limit: int | None = None):
        if array is None:
            return None
        return [item["labels"] for item in _batches({"labels": array[:limit]}, batch, partial_ok)]

    return Dataset(
        calibration=calibration_items,
        evaluation=evaluation_items,
        labels=label_items(labels),
        boxes=label_items(boxes),
        calibration_labels=label_items(calibration_labels, max(samples, batch)),
        description=f"{description}, {_sample_count(calibration_items)} calibration and "
        f"{_sample_count(evaluation_items)} held-out samples",
    )


def _sample_count(items: list[dict[str, np.ndarray]]) -> int:
    return sum(len(next(iter(item.values()))) for item in items)


# --- zoo:<dataset> --------------------------------------------------------------------------------

def _single_image_input(dataset: str, sample_shape: tuple[int, ...], inputs: Sequence[InputSpec]) -> InputSpec:
    """The model's one input, if it takes this zoo data set's images; else a DataError saying so."""
    spec = inputs[0]
    if len(inputs) != 1 or list(spec.shape[1:]) != list(sample_shape):
        wanted = [f"{s.name} {list(s.shape)}" for s in inputs]
        shape = ", ".join(["batch", *map(str, sample_shape)])
        raise DataError(
            f"data.source zoo:{dataset} gives one input of shape [{shape}], but the model's "
            f"inputs are {', '.join(wanted)}; use data.source random or a .npz file for this model"
        )
    return spec


def _digits(samples: int, inputs: Sequence[InputSpec]) -> Dataset:
    spec = _single_image_input("digits", DIGITS_SHAPE, inputs)
    train_x, test_x, train_y, test_y = digits_split()
    dtype = numpy_dtype(spec)
    return _labelled(
        calibration={spec.name: train_x.astype(dtype)},
        evaluation={spec.name: test_x.astype(dtype)},
        labels=test_y,
        calibration_labels=train_y,
        samples=samples,
        inputs=inputs,
        description="scikit-learn digits",
    )


def _textlines(samples: int, inputs: Sequence[InputSpec]) -> Dataset:
    from optimizer.zoo import textlines

    spec = _single_image_input("textlines", TEXTLINES_SHAPE, inputs)
    batch = spec.shape[0]
    calibration, calibration_labels = textlines.render_batch(max(samples, batch), textlines.SEEDS["calibration"])
    evaluation, labels = textlines.render_batch(max(TEXTLINES_EVALUATION, batch), textlines.SEEDS["evaluation"])
    dtype = numpy_dtype(spec)
    return _labelled(
        calibration={spec.name: calibration.astype(dtype)},
        evaluation={spec.name: evaluation.astype(dtype)},
        labels=labels,
        calibration_labels=calibration_labels,
        samples=samples,
        inputs=inputs,
        description="synthetic text lines (DejaVu fonts)",
    )


SHAPES_EVALUATION = 128  # held-out scenes at 128×128 (~320 boxes): mAP@0.5 moves in steps well under a point
SHAPES_EVALUATION_LARGE = 32  # at a larger side (zoo:yolov4's 320): each scene costs a 257 MB model ~1 s per variant


def _shapes(samples: int, inputs: Sequence[InputSpec]) -> Dataset:
    from optimizer.zoo import shapes

    shape = inputs[0].shape
    square = len(shape) == 4 and shape[-1] == shape[-2] and 64 <= shape[-1] <= 1024
    side = shape[-1] if square else shapes.SIZE  # else _single_image_input names the shape it gives
    spec = _single_image_input("shapes", (3, side, side), inputs)
    batch = spec.shape[0]
    evaluation_count = SHAPES_EVALUATION if side <= shapes.SIZE else SHAPES_EVALUATION_LARGE
    calibration, _, calibration_labels = shapes.render(max(samples, batch), shapes.SEEDS["calibration"], size=side)
    evaluation, boxes, labels = shapes.render(max(evaluation_count, batch), shapes.SEEDS["evaluation"], size=side)
    dtype = numpy_dtype(spec)
    return _labelled(
        calibration={spec.name: calibration.astype(dtype)},
        evaluation={spec.name: evaluation.astype(dtype)},
        labels=labels,
        boxes=boxes,
        calibration_labels=calibration_labels,
        samples=samples,
        inputs=inputs,
        description=f"synthetic scenes of shapes with labelled boxes at {side}×{side}",
    )


ZOO_DATASETS = {"digits": _digits, "textlines": _textlines, "shapes": _shapes}


def _zoo(name: str, samples: int, inputs: Sequence[InputSpec]) -> Dataset:
    if name not in ZOO_DATASETS:
        raise DataError(
            f"data.source zoo:{name} is not a zoo data set; available: "
            + ", ".join(f"zoo:{known}" for known in ZOO_DATASETS)
        )
    return ZOO_DATASETS[name](samples, inputs)


# --- .npz files ------------------------------------------------------------------------------------

def _npy_bytes(member) -> int:
    """The bytes a .npy member's array takes once loaded, from its header alone."""
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(member)
    return math.prod(shape) * dtype.itemsize  # Python ints: a header claiming 10^30 elements cannot overflow


def _check_decompressed_size(path: Path, max_bytes: int) -> None:
    """A small .npz can decompress to any size (and numpy allocates what an array's header declares
    before reading it): before loading, every member's size from the zip directory and every array's
    from its .npy header, each total within data.maxSizeMB."""
    limit = f"data.maxSizeMB ({max_bytes // 2**20})"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            stored = sum(info.file_size for info in members)
            if stored > max_bytes:
                raise DataError(f"data.source: {path.name} decompresses to {stored / 1e6:.0f} MB (the archive is "
                                f"{path.stat().st_size / 1e6:.1f} MB), over {limit}; raise it to load this data")
            declared = 0
            for info in members:
                if info.filename.endswith(".npy"):
                    with archive.open(info) as member:
                        declared += _npy_bytes(member)
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"data.source: cannot read {path} as .npz ({error})") from None
    if declared > max_bytes:
        raise DataError(f"data.source: the arrays in {path.name} declare {declared / 1e6:.0f} MB in their headers "
                        f"(the archive holds {stored / 1e6:.1f} MB), over {limit}; raise it to load this data")


def _read_npz(path: Path, max_bytes: int) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"data.source: {path} does not exist; give a .npz path relative to the spec file")
    if zipfile.is_zipfile(path):
        _check_decompressed_size(path, max_bytes)
    try:
        # allow_pickle=False: a data file must never run code, so object arrays are refused.
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"data.source: cannot read {path} as .npz ({error})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"data.source: {path} is a single .npy array; save one array per input with np.savez")
    try:
        with loaded as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as error:  # raised per array: "Object arrays cannot be loaded ..."
        raise DataError(
            f"data.source: {path} cannot be read without pickle ({error}); save plain numeric "
            "arrays, e.g. np.savez(path, image=x.astype(np.float32), labels=y)"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"data.source: cannot read {path} as .npz ({error})") from None


def _checked_input(arrays: dict[str, np.ndarray], spec: InputSpec, path: Path) -> np.ndarray:
    expected = ["samples"] + [spec.dynamicAxes.get(axis, size) for axis, size in enumerate(spec.shape)][1:]
    if spec.name not in arrays:
        raise DataError(
            f"data.source: {path} has no array {spec.name!r} (found: {', '.join(sorted(arrays)) or 'none'}); "
            f"add one of shape {expected}"
        )
    array = arrays[spec.name]
    fixed_mismatch = array.ndim != len(spec.shape) or any(
        array.shape[axis] != size for axis, size in enumerate(spec.shape)
        if axis > 0 and axis not in spec.dynamicAxes
    )
    if fixed_mismatch:
        raise DataError(
            f"data.source: array {spec.name!r} in {path} has shape {list(array.shape)}; "
            f"expected {expected} (first axis = samples)"
        )
    dtype = numpy_dtype(spec)
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise DataError(f"data.source: array {spec.name!r} in {path} is {array.dtype}; the input expects {dtype}")
    return array.astype(dtype)


def _checked_boxes(arrays: dict[str, np.ndarray], labels: np.ndarray | None, path: Path) -> np.ndarray | None:
    """Labelled boxes for a detector: [samples, max_boxes, 4] beside labels [samples, max_boxes]."""
    if "boxes" not in arrays:
        return None
    boxes = arrays["boxes"]
    if labels is None or labels.ndim != 2 or boxes.shape != (*labels.shape, 4) \
            or not np.issubdtype(boxes.dtype, np.number):
        found = "no 'labels'" if labels is None else f"'labels' of shape {list(labels.shape)}"
        raise DataError(
            f"data.source: 'boxes' in {path} has shape {list(boxes.shape)} and {found}; a detector's labelled boxes are "
            "'boxes' [samples, max_boxes, 4] with 'labels' [samples, max_boxes] (class ids, -1 for padding rows)")
    return boxes.astype(np.float32)


def _checked_labels(arrays: dict[str, np.ndarray], count: int, path: Path) -> np.ndarray | None:
    if "labels" not in arrays:
        return None
    labels = arrays["labels"]
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape[:1] != (count,):
        raise DataError(
            f"data.source: 'labels' in {path} must be integers with one entry per sample "
            f"({count}); got {labels.dtype} of shape {list(labels.shape)}"
        )
    return labels.astype(np.int64)


def _npz(path: Path, samples: int, inputs: Sequence[InputSpec], max_bytes: int) -> Dataset:
    arrays = _read_npz(path, max_bytes)
    loaded = sum(array.nbytes for array in arrays.values())
    if loaded > max_bytes:  # the headers said otherwise: never keep more than the limit in memory
        raise DataError(f"data.source: the arrays in {path.name} take {loaded / 1e6:.0f} MB, over data.maxSizeMB "
                        f"({max_bytes // 2**20}); raise it to load this data")
    checked = {spec.name: _checked_input(arrays, spec, path) for spec in inputs}
    counts = {name: len(array) for name, array in checked.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"data.source: arrays in {path} disagree on the number of samples: {counts}")
    count = next(iter(counts.values()))
    batch, partial_ok = _batch_size(inputs[0])
    half = count // 2
    if half < (1 if partial_ok else batch):
        raise DataError(
            f"data.source: {path} has {count} samples; it needs at least {2 * max(batch, 1)} "
            "(half for calibration, half for evaluation)"
        )
    labels = _checked_labels(arrays, count, path)
    boxes = _checked_boxes(arrays, labels, path)
    return _labelled(
        calibration={name: array[:half] for name, array in checked.items()},
        evaluation={name: array[half:] for name, array in checked.items()},
        labels=None if labels is None else labels[half:],
        boxes=None if boxes is None else boxes[half:],
        calibration_labels=None if labels is None else labels[:half],
        samples=samples,
        inputs=inputs,
        description=path.name,
    )


# One flipped decision (an argmax that changed) may cost at most this share of the accuracy budget, so a
# sound variant is never rejected for one flip (a 32-item split made one flip 3.1 points against a 1-point
# budget). The default budget (1 point) needs 400 decisions; a tighter one stops at the cap.
FLIP_SHARE_OF_BUDGET = 0.25
EVALUATION_CAP = 1024  # held-out items at most: each variant runs every one of them


def argmax_decisions(output) -> int:
    """The decisions agreement counts in one output: one per argmax over its last axis (a scalar is one)."""
    array = np.asarray(output)
    return max(1, array.size // max(array.shape[-1], 1)) if array.ndim else 1


def budget_decisions(acceptance) -> int:
    """Decisions the evaluation needs so one flip is at most FLIP_SHARE_OF_BUDGET of the tightest budget
    (a relative budget taken as absolute: exact for agreement, whose FP32 value is 1)."""
    budgets = [b for b in (acceptance.maxAccuracyDrop, acceptance.maxRelativeAccuracyDrop) if b is not None]
    if not budgets or min(budgets) <= 0:
        return EVALUATION_CAP
    return math.ceil(1 / (FLIP_SHARE_OF_BUDGET * min(budgets)) - 1e-9)


def evaluation_items(acceptance, per_item: int, samples: int) -> int:
    """Held-out random items for the budget: enough decisions (`per_item` in each model call), at least
    the half of `samples` it always was, at most EVALUATION_CAP."""
    needed = math.ceil(budget_decisions(acceptance) / max(per_item, 1))
    return max(samples - max(1, samples // 2), min(EVALUATION_CAP, needed))


def _decisions_per_item(run: Run) -> int:
    """Argmax decisions in one model call at the declared shapes: a classifier's batch, a sequence model's
    batch x length (one FP32 call of the model as loaded)."""
    from optimizer.engines.feeds import random_feed
    from optimizer.engines.runners import TorchRunner
    from optimizer.steps.export import onnx_source_runner

    loaded = run.loaded
    if loaded.onnx_path is not None:  # an ONNX Runtime that cannot run it is a load error, as in the export step
        runner = onnx_source_runner(loaded.onnx_path, run.spec.spec.benchmark.threads, "cpu")
    else:
        runner = TorchRunner(loaded.module, [spec.name for spec in loaded.inputs])
    return argmax_decisions(runner(random_feed(loaded.inputs))[0])


def _sized_evaluation(run: Run, source: str, chosen: bool, samples: int) -> int | None:
    """The random split's held-out items sized from the budget, or None to keep half of `samples`: the
    user's data.samples is theirs to choose (the report says what it rests on), a zoo model's own count is
    chosen for its cost, and a detector's verdict is box mAP, not argmaxes."""
    if chosen or source != "random" or run.loaded.default_samples or run.loaded.detection is not None:
        return None
    return evaluation_items(run.spec.spec.acceptance, _decisions_per_item(run), samples)


def data_step(run: Run) -> None:
    from optimizer.steps.select import resolve_metric

    data = run.spec.spec.data
    source = data.source if "source" in data.model_fields_set else run.loaded.default_data
    chosen = "samples" in data.model_fields_set
    samples = data.samples if chosen else (run.loaded.default_samples or data.samples)
    evaluation = _sized_evaluation(run, source, chosen, samples)
    run.dataset = load_dataset(source, samples, run.loaded.inputs, run.base_dir, data, run.spec.spec.storage,
                               evaluation)
    run.dataset.sized_from_budget = evaluation is not None
    run.data_source = source
    run.reporter.log(f"data: {run.dataset.description}")
    labels = run.dataset.labels
    run.metric = resolve_metric(run.spec.spec.acceptance.metric, run.loaded.metric, labels is not None, source,
                                sequence_labels=labels is not None and labels[0].ndim == 2,
                                detector=run.loaded.detection is not None, box_labels=run.dataset.boxes is not None)
