"""Train the zoo's crnn-ocr model (the research note's CRNN, CTC on synthetic text lines) and
score it on held-out lines rendered from a different seed.

    .venv/bin/python benchmarks/train_crnn.py [--steps N] [--held-out 512]

Uses the same training function as the zoo's first-use build and writes the same cache file
(`<cache>/zoo/crnn-ocr-<version>-<steps>.safetensors`), so a later `zoo:crnn-ocr` loads it.
Progress goes to stderr; the result (CER, as mlopt's char-accuracy metric 1 − CER, exact match,
time) to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from optimizer.measure.metrics import cer, char_accuracy, exact_match
from optimizer.zoo import crnn_ocr, textlines
from optimizer.zoo.weights import save_atomically


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=crnn_ocr.steps())
    parser.add_argument("--held-out", type=int, default=512, help="held-out lines to score")
    args = parser.parse_args()

    started = time.perf_counter()

    def log(step: int, loss: float) -> None:
        print(f"step {step}/{args.steps}  ctc loss {loss:.3f}  {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)

    model = crnn_ocr.train(args.steps, log=log)
    trained_s = time.perf_counter() - started
    path = crnn_ocr.cache_path(args.steps)
    save_atomically(model, path)

    images, labels = textlines.render_batch(args.held_out, textlines.SEEDS["evaluation"])
    outputs = [[scores] for scores in crnn_ocr.predict(model, images)]  # one item per PREDICT_BATCH lines
    label_items = np.split(labels, range(crnn_ocr.PREDICT_BATCH, len(labels), crnn_ocr.PREDICT_BATCH))
    print(f"crnn-ocr {crnn_ocr.VERSION}: {args.steps} steps × batch {crnn_ocr.BATCH} in {trained_s:.0f} s; "
          f"held-out ({args.held_out} lines, seed {textlines.SEEDS['evaluation']}): "
          f"CER {cer(outputs, label_items):.2%} (char-accuracy {char_accuracy(outputs, label_items):.2%}), "
          f"exact match {exact_match(outputs, label_items):.2%}; "
          f"cached at {path}")


if __name__ == "__main__":
    main()
