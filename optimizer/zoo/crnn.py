"""The research note's CRNN text recognizer (conv backbone, two bidirectional LSTMs, CTC-style head).

The layer layout follows the note exactly so that sizes and timings compare with its tables:
seven Conv+BatchNorm+ReLU blocks, map_to_seq Linear(512, 64), rnn1 LSTM(64, 256, bi),
rnn2 LSTM(512, 256, bi), dense Linear(512, 42). A 1×1×32×100 line gives 24 time steps.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from optimizer.zoo.weights import calibrate_batchnorm, seeded

NUM_CLASSES = 42  # 41 characters + the CTC blank
HEIGHT, WIDTH = 32, 100
SEED = 20261127

# (in, out, kernel, padding) per conv, and the pooling that follows it, as in the note.
_CONVS = [(1, 64, 3, 1), (64, 128, 3, 1), (128, 256, 3, 1), (256, 256, 3, 1),
          (256, 512, 3, 1), (512, 512, 3, 1), (512, 512, 2, 0)]
_POOL_AFTER = {0: (2, 2), 1: (2, 2), 3: (2, 1), 5: (2, 1)}


def _backbone() -> nn.Sequential:
    """convN, batchnormN, reluN as separate children, so FX fusion finds conv-bn-relu."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for index, (inputs, outputs, kernel, padding) in enumerate(_CONVS):
        layers[f"conv{index}"] = nn.Conv2d(inputs, outputs, kernel, padding=padding)
        layers[f"batchnorm{index}"] = nn.BatchNorm2d(outputs)
        layers[f"relu{index}"] = nn.ReLU()
        if index in _POOL_AFTER:
            layers[f"pooling{sorted(_POOL_AFTER).index(index)}"] = nn.MaxPool2d(_POOL_AFTER[index])
    return nn.Sequential(layers)


class CRNN(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cnn = _backbone()
        self.map_to_seq = nn.Linear(512, 64)  # 512 channels × height 1 after the backbone
        self.rnn1 = nn.LSTM(64, 256, bidirectional=True)
        self.rnn2 = nn.LSTM(512, 256, bidirectional=True)
        self.dense = nn.Linear(512, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.cnn(image)  # (batch, 512, 1, time)
        # flatten/permute instead of view(batch, c*h, w) with sizes read from the tensor: no
        # Python ints enter the graph, so FX tracing and ONNX dynamic width/batch keep working.
        sequence = features.flatten(1, 2).permute(2, 0, 1)  # (time, batch, 512)
        recurrent, _ = self.rnn1(self.map_to_seq(sequence))
        recurrent, _ = self.rnn2(recurrent)
        return self.dense(recurrent)  # (time, batch, classes)


def build() -> CRNN:
    with seeded(SEED):
        model = CRNN()
        # Only the backbone has BatchNorm; running the LSTMs in the calibration would be wasted time.
        calibrate_batchnorm(model.cnn, lambda: torch.rand(2, 1, HEIGHT, WIDTH), steps=4)
    return model.eval()
