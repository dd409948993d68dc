"""Deterministic weights for zoo models that ship without trained ones.

Random weights are enough to measure speed and fidelity, but they must be the same on every
machine and every run, and BatchNorm must not be an identity (a fresh BatchNorm has mean 0,
variance 1, which would make Conv+BN folding and INT8 calibration trivially easy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def calibrate_batchnorm(module: torch.nn.Module, make_batch: Callable[[], torch.Tensor], steps: int) -> None:
    """Set every BatchNorm's running statistics to their average over `steps` batches, then eval().

    momentum=None makes BatchNorm keep a cumulative average, so a few batches give exact
    statistics instead of a blend with the initial mean 0 / variance 1.
    """
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    module.train()
    with torch.no_grad():
        for _ in range(steps):
            module(make_batch())
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    module.eval()
