"""torch-int8-qat: quantization-aware training with torch.ao's FX graph mode.

A copy of the model gets fake quantization (x86 QAT qconfig), is fine-tuned for `qatSteps` steps
on the labelled calibration data so its weights adapt to 8-bit rounding, then is converted to
real INT8 kernels and saved as TorchScript like the other PyTorch recipes.
"""

from __future__ import annotations

import warnings

import numpy as np

from optimizer.api.spec import SEQUENCE_METRICS  # CTC: outputs (T, B, C), labels padded with -1
from optimizer.engines import BuildContext, Built, NotApplicable
from optimizer.engines.torch_ao import ENGINE, _built, _example, _require_eager, fx_prepare
BATCH_SAMPLES = 16  # samples per training step when the batch axis is dynamic


def _training_items(ctx: BuildContext) -> list[tuple[dict, np.ndarray]]:
    labels = getattr(ctx.dataset, "calibration_labels", None)
    if labels is None:
        raise NotApplicable(
            f"torch-int8-qat needs labelled data: data.source {ctx.data_source} has no labels for its calibration "
            "split; give a .npz with a 'labels' array or a labelled zoo data set"
        )
    items = list(zip(ctx.dataset.calibration, labels))
    if 0 not in ctx.loaded.inputs[0].dynamicAxes:
        return items
    return [_concatenated(items[start:start + BATCH_SAMPLES]) for start in range(0, len(items), BATCH_SAMPLES)]


def _concatenated(chunk: list[tuple[dict, np.ndarray]]) -> tuple[dict, np.ndarray]:
    """Several items as one batch; CTC labels are padded with -1 to the longest."""
    feeds = {name: np.concatenate([feed[name] for feed, _ in chunk]) for name in chunk[0][0]}
    labels = [np.asarray(label) for _, label in chunk]
    if labels[0].ndim < 2:
        return feeds, np.concatenate(labels)
    width = max(label.shape[1] for label in labels)
    padded = [np.pad(label, ((0, 0), (0, width - label.shape[1])), constant_values=-1) for label in labels]
    return feeds, np.concatenate(padded)


def _loss(metric: str):
    import torch
    import torch.nn.functional as F

    if metric in SEQUENCE_METRICS:
        def ctc(outputs, labels):  # outputs (T, B, C) logits; blank = class 0
            log_probs = F.log_softmax(outputs, dim=-1)
            lengths = (labels >= 0).sum(dim=1)
            targets = labels[labels >= 0]
            steps = torch.full((outputs.shape[1],), outputs.shape[0], dtype=torch.long)
            return F.ctc_loss(log_probs, targets, steps, lengths, blank=_ctc_blank(), zero_infinity=True)
        return ctc

    def cross_entropy(outputs, labels):  # classification: logits (B, C) or (..., C)
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), labels.reshape(-1))
    return cross_entropy


def _ctc_blank() -> int:
    try:  # the text-line data set owns the CTC convention (the metrics decode with it too)
        from optimizer.zoo.textlines import BLANK
    except ImportError:
        return 0
    return BLANK


def _first(outputs):
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def _fine_tune(ctx: BuildContext, prepared, steps: int, learning_rate: float) -> list[float]:
    import torch
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats

    items, loss_of = _training_items(ctx), _loss(ctx.metric)
    names = [spec.name for spec in ctx.loaded.inputs]
    optimizer = torch.optim.Adam(prepared.parameters(), lr=learning_rate)
    prepared.train()
    # Small calibration batches would make BatchNorm statistics noisy; keep the trained ones.
    prepared.apply(freeze_bn_stats)
    losses = []
    with ctx.reporter.task("QAT fine-tuning", steps) as advance:
        for step in range(steps):
            feed, labels = items[step % len(items)]
            outputs = _first(prepared(*(torch.from_numpy(feed[n]) for n in names)))
            loss = loss_of(outputs, torch.from_numpy(np.asarray(labels)).long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            advance()
    return losses


def torch_int8_qat(ctx: BuildContext, variant) -> Built:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    module = _require_eager(ctx)
    if getattr(ctx.dataset, "boxes", None) is not None:
        raise NotApplicable("labelled boxes need a detection loss; torch-int8-qat fine-tunes on class or text labels")
    _training_items(ctx)  # refuse unlabelled data before any work
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fx_prepare(prepare_qat_fx, module.train(), get_default_qat_qconfig_mapping(ENGINE), _example(ctx))
        losses = _fine_tune(ctx, prepared, variant.qatSteps, variant.qatLearningRate)
        quantized = convert_fx(prepared.eval())
    options = {"mode": "fx-qat", "qconfig": f"default qat {ENGINE}", "steps": variant.qatSteps,
               "learningRate": variant.qatLearningRate, "loss": "ctc" if ctx.metric in SEQUENCE_METRICS else "cross-entropy",
               "firstLoss": round(losses[0], 4), "lastLoss": round(losses[-1], 4)}
    return _built(ctx, variant, quantized, options)
