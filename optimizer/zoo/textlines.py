"""Synthetic text lines for the trained CRNN: rendered with the DejaVu fonts matplotlib ships.

Each sample is a random string of 3–8 symbols from a 41-symbol alphabet (digits, lowercase
letters, five punctuation marks), drawn in a random DejaVu face and size, jittered (position,
small rotation and shear), scaled to height 32 the way an OCR pipeline normalises a line crop,
blurred, noised, and sometimes inverted. Images are [n, 1, 32, 100] float32 in [0, 1].

Class ids follow the CRNN's 42 outputs: 0 is the CTC blank, 1..41 are ALPHABET[0..40]. Labels are
int64 [n, MAX_LENGTH] padded with PAD. Sample i of `render_batch(n, seed)` depends only on
(seed, i), so a batch's first k samples equal `render_batch(k, seed)`.
"""

from __future__ import annotations

import string
from functools import lru_cache
from pathlib import Path

import numpy as np

ALPHABET = string.digits + string.ascii_lowercase + "-.:/#"
BLANK = 0
PAD = -1
MIN_LENGTH, MAX_LENGTH = 3, 8
HEIGHT, WIDTH = 32, 100
NUM_CLASSES = len(ALPHABET) + 1  # + the CTC blank: the CRNN's 42 outputs
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono.ttf",
              "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf")
# The one definition of who sees which lines: crnn-ocr trains on TRAIN, zoo:textlines calibrates
# on CALIBRATION and evaluates (as does benchmarks/train_crnn.py) on EVALUATION.
SEEDS = {"train": 1001, "calibration": 2001, "evaluation": 2002}
_RENDER_SIZE = 40  # glyphs are drawn large, then the line is scaled down to HEIGHT

assert NUM_CLASSES == 42, "the CRNN's head has 42 outputs"


def encode(text: str) -> list[int]:
    """Class ids (1..41) of a string over ALPHABET."""
    try:
        return [ALPHABET.index(char) + 1 for char in text]
    except ValueError:
        raise ValueError(f"{text!r} has a symbol outside the alphabet {ALPHABET!r}") from None


def decode(ids) -> str:
    """The string of class ids, skipping the blank and padding."""
    return "".join(ALPHABET[int(i) - 1] for i in ids if 0 < int(i) <= len(ALPHABET))


def decode_greedy(logits: np.ndarray) -> list[str]:
    """CTC greedy decoding of (time, batch, classes) scores: argmax, collapse repeats, drop blanks."""
    best = np.asarray(logits).argmax(axis=-1)  # (time, batch)
    texts = []
    for path in best.T:
        keep = np.ones(len(path), dtype=bool)
        keep[1:] = path[1:] != path[:-1]
        texts.append(decode(path[keep]))
    return texts


def pad_labels(texts: list[str]) -> np.ndarray:
    labels = np.full((len(texts), MAX_LENGTH), PAD, dtype=np.int64)
    for row, text in enumerate(texts):
        ids = encode(text)[:MAX_LENGTH]
        labels[row, :len(ids)] = ids
    return labels


def label_texts(labels: np.ndarray) -> list[str]:
    """The reference strings of padded label rows."""
    return [decode(row[row != PAD]) for row in np.asarray(labels).reshape(-1, np.asarray(labels).shape[-1])]


@lru_cache(maxsize=None)
def _font(file: str, size: int):
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / file), size)


def _render_one(text: str, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFilter

    font = _font(FONT_FILES[rng.integers(len(FONT_FILES))], int(rng.integers(_RENDER_SIZE - 6, _RENDER_SIZE + 7)))
    left, top, right, bottom = font.getbbox(text)
    margin_x, margin_y = rng.integers(2, 12, size=2), rng.integers(2, 10, size=2)
    width, height = right - left + margin_x.sum(), bottom - top + margin_y.sum()
    # Drawn white-on-black so rotation/shear fill with background; colours are applied afterwards.
    canvas = Image.new("L", (int(width), int(height)), 0)
    ImageDraw.Draw(canvas).text((int(margin_x[0] - left), int(margin_y[0] - top)), text, fill=255, font=font)
    shear = float(rng.uniform(-0.25, 0.25))
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, (1, shear, -shear * height / 2, 0, 1, 0),
                              resample=Image.Resampling.BILINEAR)
    canvas = canvas.rotate(float(rng.uniform(-3, 3)), resample=Image.Resampling.BILINEAR, expand=False)
    # Scale to HEIGHT keeping the aspect ratio; squeeze only lines wider than WIDTH.
    scaled_width = min(WIDTH, max(8, round(canvas.width * HEIGHT / canvas.height)))
    canvas = canvas.resize((scaled_width, HEIGHT), Image.Resampling.BILINEAR)
    line = Image.new("L", (WIDTH, HEIGHT), 0)
    line.paste(canvas, (int(rng.integers(0, WIDTH - scaled_width + 1)), 0))
    line = line.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.0))))

    ink = np.asarray(line, dtype=np.float32) / 255.0  # 1 where the text is
    paper, text_tone = rng.uniform(0.75, 1.0), rng.uniform(0.0, 0.3)
    image = paper + (text_tone - paper) * ink  # dark text on light paper
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.06), size=image.shape)
    if rng.random() < 0.25:
        image = 1.0 - image
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def random_text(rng: np.random.Generator) -> str:
    length = int(rng.integers(MIN_LENGTH, MAX_LENGTH + 1))
    return "".join(ALPHABET[i] for i in rng.integers(len(ALPHABET), size=length))


def render_texts(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """n rendered lines and their strings; sample i is seeded by (seed, i)."""
    images = np.empty((n, 1, HEIGHT, WIDTH), dtype=np.float32)
    texts = []
    for index in range(n):
        rng = np.random.default_rng((seed, index))
        text = random_text(rng)
        images[index, 0] = _render_one(text, rng)
        texts.append(text)
    return images, texts


def render_batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, 1, 32, 100] float32 in [0, 1], labels int64 [n, MAX_LENGTH] padded with PAD)."""
    images, texts = render_texts(n, seed)
    return images, pad_labels(texts)
