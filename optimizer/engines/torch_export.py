"""torch.export plumbing shared by the export step and the recipes that start from torch.export
(PT2E INT8, the GPU recipes)."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

from optimizer.api.spec import InputSpec
from optimizer.engines.feeds import random_feed

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# torch logs through its own stderr handler (not the root logger the run collects from): these
# would print over the progress display.
_NOISY_LOGGERS = ("torch.utils._pytree", "torch._dynamo", "torch._inductor", "torch.export", "torch._export",
                  "torchao")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.export's, dynamo's and inductor's log lines and warnings off for the block."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def dynamic_example(inputs: list[InputSpec]):
    """torch.export treats size-1 dims as constants: a batch-1 example would pin batch to 1."""
    import torch

    shapes = {s.name: [max(n, 2) if a in s.dynamicAxes else n for a, n in enumerate(s.shape)] for s in inputs}
    return tuple(torch.from_numpy(a) for a in random_feed(inputs, shapes).values())


def dynamic_shapes(inputs: list[InputSpec]):
    """The spec's dynamic axes as torch.export dims (None when every shape is fixed)."""
    import torch

    dynamic = tuple({axis: torch.export.Dim.DYNAMIC for axis in spec.dynamicAxes} or None for spec in inputs)
    return dynamic if any(dynamic) else None


def root_cause(error: BaseException) -> str:
    """The root cause's first line: exporters wrap the useful message in several layers."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
