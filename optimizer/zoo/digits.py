"""A small CNN for scikit-learn's digits, trained on first use and cached as safetensors.

The zoo's one model with real labels: it makes top-1 accuracy (not just agreement with FP32)
meaningful for the INT8 variants. Training takes a few seconds on one CPU core, so it happens on
the first build and later builds load `<cache>/zoo/digits-cnn-<VERSION>.safetensors`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from optimizer.artifacts.cache import cache_dir
from optimizer.zoo.digits_data import digits_split
from optimizer.engines.runners import torch_threads
from optimizer.zoo.weights import cached_or_trained, seeded

# Part of the cache file name: bump it whenever the architecture or the training changes, so an
# old cache is never loaded into a different model.
VERSION = "v1"
SEED = 20261130
EPOCHS = 15  # test top-1 is ~0.99 from 10 epochs on; 15 leaves a margin
BATCH = 64
LEARNING_RATE = 3e-3


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1), bn1=nn.BatchNorm2d(16), relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3, padding=1), bn2=nn.BatchNorm2d(32), relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
        ))
        self.classifier = nn.Sequential(OrderedDict(
            flatten=nn.Flatten(), fc1=nn.Linear(32 * 4 * 4, 64), relu=nn.ReLU(), fc2=nn.Linear(64, 10),
        ))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))  # (batch, 10) logits


def cache_path() -> Path:
    return cache_dir("zoo") / f"digits-cnn-{VERSION}.safetensors"


def train() -> DigitsCNN:
    """Adam on the training split with fixed seeds; returns the model in eval mode."""
    train_x, _, train_y, _ = (torch.from_numpy(array) for array in digits_split())
    # One thread: ops this small are dominated by thread hand-offs (20x slower with 2 threads on a
    # busy 2-core machine), and the trained weights then do not depend on the core count.
    with seeded(SEED), torch_threads(1):
        model = DigitsCNN().train()
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        for _ in range(EPOCHS):
            for batch in torch.randperm(len(train_x)).split(BATCH):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
                optimizer.step()
    return model.eval()


def build() -> DigitsCNN:
    return cached_or_trained("digits", DigitsCNN, train, cache_path())