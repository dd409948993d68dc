"""An LSTM text classifier: token ids → Embedding → LSTM → Linear on the last step.

The zoo's sequence model without convolutions: the PyTorch and ONNX dynamic recipes (LSTM,
Linear) are what matter here; static recipes have little to quantize.
"""

from __future__ import annotations

import torch
from torch import nn

from optimizer.zoo.weights import seeded

VOCABULARY = 1000
EMBEDDING = 64
HIDDEN = 128
NUM_CLASSES = 4
SEQUENCE = 32
SEED = 20261129


class TextLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, EMBEDDING)
        self.lstm = nn.LSTM(EMBEDDING, HIDDEN, batch_first=True)
        self.classifier = nn.Linear(HIDDEN, NUM_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embedding(tokens))  # (batch, sequence, hidden)
        return self.classifier(states[:, -1])  # (batch, classes)


def build() -> TextLSTM:
    with seeded(SEED):
        model = TextLSTM()
    return model.eval()
