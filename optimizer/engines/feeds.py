"""Feeds: the inputs every runner takes (input name -> numpy array), and the one generator of random
ones: the data step's items, the export's parity and example feeds, the benchmark's input."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from optimizer.api.spec import InputSpec

DEFAULT_RANGES = {"float": (0.0, 1.0), "int": (0, 100)}


def numpy_dtype(spec: InputSpec) -> np.dtype:
    # InputSpec's default dtype stays a DType member (pydantic leaves defaults unconverted).
    return np.dtype(getattr(spec.dtype, "value", spec.dtype))


def random_value(spec: InputSpec, rng: np.random.Generator, shape: Sequence[int] | None = None) -> np.ndarray:
    """One input's random values within its valueRange, at `shape` (default: the declared one). The one
    generator of random inputs: the data step's items and the export's parity and example feeds."""
    dtype = numpy_dtype(spec)
    kind = "int" if np.issubdtype(dtype, np.integer) else "float"
    low, high = spec.valueRange or DEFAULT_RANGES[kind]
    shape = spec.shape if shape is None else shape
    if kind == "int":
        # Inclusive high, as InputSpec.valueRange says: [0, 999] for a 1000-word vocabulary must reach id 999.
        return rng.integers(int(low), int(high), size=shape, endpoint=True).astype(dtype)
    return rng.uniform(low, high, size=shape).astype(dtype)


def random_feed(inputs: list[InputSpec], shapes: dict[str, list[int]] | None = None, seed: int = 0):
    """Seeded inputs within each input's valueRange (random_value), at `shapes`."""
    rng = np.random.default_rng(seed)
    return {spec.name: random_value(spec, rng, (shapes or {}).get(spec.name)) for spec in inputs}
