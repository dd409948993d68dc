"""The research note's CRNN, trained with CTC on synthetic text lines and cached as safetensors.

Same architecture as `zoo:crnn` (the same class), so sizes and timings compare; the trained
weights make character accuracy (1 − CER) and exact match meaningful for the INT8 variants.
Training takes ~25 minutes on a busy 2-core CPU, so it happens on the first build and later
builds load `<cache>/zoo/crnn-ocr-<VERSION>-<steps>.safetensors`. `MLOPT_CRNN_OCR_STEPS` overrides the step
count (tests use a handful); the step count is part of the file name so a short run never
masquerades as the real model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from optimizer.artifacts.cache import cache_dir
from optimizer.zoo import textlines
from optimizer.engines.runners import torch_threads
from optimizer.zoo.crnn import CRNN
from optimizer.zoo.weights import cached_or_trained, seeded, warmup_cosine

# Part of the cache file name: bump it whenever the architecture, the renderer or the training
# changes, so an old cache is never loaded as a different model.
VERSION = "v1"
SEED = 20261201
STEPS = 3000  # measured: ~0.5 s per step (1 thread, bfloat16) on a 2-core Zen 4, so ~25 minutes
BATCH = 16  # measured: a step of 32 lines took 2.7× as long as one of 16
POOL = 32_000  # at most this many lines rendered once (uint8); batches are drawn from it
LEARNING_RATE = 1e-3
THREADS = 1  # measured on a busy 2-core machine: 2 threads made each step 3× slower


def steps() -> int:
    return int(os.environ.get("MLOPT_CRNN_OCR_STEPS") or STEPS)


def cache_path(step_count: int | None = None) -> Path:
    return cache_dir("zoo") / f"crnn-ocr-{VERSION}-{step_count or steps()}.safetensors"


def _fast_bfloat16() -> bool:
    """bfloat16 autocast where the CPU does it natively (1.8× faster steps on Zen 4); elsewhere it
    would be emulated and slower, so train in float32. Either way the cached weights are float32."""
    return torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_bf16_supported()


def _pool(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rendered once and kept as uint8: rendering per step would cost as much as the step."""
    images, labels = textlines.render_batch(size, seed)
    return np.round(images * 255).astype(np.uint8), labels


def _ctc_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = (labels != textlines.PAD).sum(dim=1)
    return labels[labels != textlines.PAD], lengths


def train(step_count: int | None = None, log: Callable[[int, float], None] | None = None) -> CRNN:
    """Adam + CTC on a fixed rendered pool with fixed seeds; returns the model in eval mode.

    `log(step, loss)` is called every 50 steps (the benchmark prints progress with it).
    """
    step_count = step_count or steps()
    pool_images, pool_labels = _pool(min(POOL, step_count * BATCH), textlines.SEEDS["train"])
    ctc = nn.CTCLoss(blank=textlines.BLANK, zero_infinity=True)
    generator = np.random.default_rng(SEED)
    bfloat16 = _fast_bfloat16()
    with seeded(SEED), torch_threads(THREADS):
        model = CRNN(num_classes=textlines.NUM_CLASSES).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(step_count))
        running = None
        for step in range(1, step_count + 1):
            batch = generator.integers(len(pool_images), size=BATCH)
            images = torch.from_numpy(pool_images[batch]).float().div_(255.0)
            targets, target_lengths = _ctc_targets(torch.from_numpy(pool_labels[batch]))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                scores = model(images)
            log_probs = scores.float().log_softmax(dim=-1)  # (time, batch, classes)
            input_lengths = torch.full((BATCH,), log_probs.shape[0], dtype=torch.long)
            loss = ctc(log_probs, targets, input_lengths, target_lengths)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            schedule.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if log is not None and (step % 50 == 0 or step == step_count):
                log(step, running)
    return model.eval()


def build() -> CRNN:
    return cached_or_trained(f"crnn-ocr ({steps()} steps; minutes on a CPU)",
                             lambda: CRNN(num_classes=textlines.NUM_CLASSES), train, cache_path())


PREDICT_BATCH = 64


def predict(model: nn.Module, images: np.ndarray) -> list[np.ndarray]:
    """The model's (time, batch, classes) scores for each PREDICT_BATCH lines of `images`."""
    with torch.no_grad(), torch_threads(THREADS):
        return [model(torch.from_numpy(images[start:start + PREDICT_BATCH])).numpy()
                for start in range(0, len(images), PREDICT_BATCH)]
