"""torch.export plumbing shared by the export step and the PT2E recipes."""

from __future__ import annotations

import re

from optimizer.api.spec import InputSpec
from optimizer.engines.feeds import random_feed

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def dynamic_example(inputs: list[InputSpec]):
    """torch.export treats size-1 dims as constants: a batch-1 example would pin batch to 1."""
    import torch

    shapes = {s.name: [max(n, 2) if a in s.dynamicAxes else n for a, n in enumerate(s.shape)] for s in inputs}
    return tuple(torch.from_numpy(a) for a in random_feed(inputs, shapes).values())


def root_cause(error: BaseException) -> str:
    """The root cause's first line: exporters wrap the useful message in several layers."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
