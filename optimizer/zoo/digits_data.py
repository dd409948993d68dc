"""scikit-learn's digits, split once: the zoo's digits model trains on one part and zoo:digits
evaluates on the other (torch-free, so the data step needs no model to read it)."""

from __future__ import annotations

import numpy as np

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.3
DIGITS_SHAPE = (1, 8, 8)  # per sample: one grey channel, 8×8 pixels


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as (train_x, test_x, train_y, test_y): float32 [n, 1, 8, 8] in [0, 1].

    The one definition of the split: the zoo's digits model trains on train_x, and zoo:digits
    evaluates on test_x, so the reported accuracy is on images the model never saw.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32).reshape(-1, *DIGITS_SHAPE)
    labels = digits.target.astype(np.int64)
    return tuple(train_test_split(images, labels, test_size=DIGITS_TEST_FRACTION,
                                  random_state=DIGITS_SPLIT_SEED, stratify=labels))
