"""Weights for zoo models: deterministic ones for models that ship untrained, and the cache of
models trained at first use.

Random weights are enough to measure speed and fidelity, but they must be the same on every
machine and every run, and BatchNorm must not be an identity (a fresh BatchNorm has mean 0,
variance 1, which would make Conv+BN folding and INT8 calibration trivially easy).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def save_atomically(model: torch.nn.Module, path: Path) -> None:
    """Safetensors (no pickle), written beside the target and renamed: a concurrent build never
    reads half a file."""
    from safetensors.torch import save_file

    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def cached_or_trained(name: str, fresh: Callable[[], torch.nn.Module], train: Callable[[], torch.nn.Module],
                      path: Path) -> torch.nn.Module:
    """The cached model at `path`, or one trained now and cached there (announced on stderr)."""
    model = load_cached(fresh(), path)
    if model is None:
        print(f"[mlopt] training the zoo's {name} model (once; cached afterwards) ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        model = train()
        save_atomically(model, path)
        print(f"[mlopt] trained the zoo's {name} model in {time.perf_counter() - started:.1f} s; cached at {path}",
              file=sys.stderr, flush=True)
    return model


def load_cached(model: torch.nn.Module, path: Path) -> torch.nn.Module | None:
    """`model` with the cached weights, in eval mode; None when there are none or they are
    unreadable (the caller then retrains)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError, OSError):
        return None
    return model.eval()


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


def warmup_cosine(step_count: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over the first 5% of steps, then cosine decay to 0."""
    warmup = max(1, step_count // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, step_count - warmup)))

    return factor
