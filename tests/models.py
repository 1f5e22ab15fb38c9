"""Small models of every architecture the engine must handle, shared by the equality tests."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 10, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GroupNormCNN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, stride=2), nn.GroupNorm(2, 8), nn.ReLU(),
        )
        self.head = nn.Linear(8 * 1 * 1, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class TextConv(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, 12, kernel_size=3, padding=1)
        self.head = nn.Linear(12, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(self.embed(tokens).transpose(1, 2)))
        return self.head(h.max(dim=2).values)


class TransformerClassifier(nn.Module):
    """Native nn.TransformerEncoderLayer (with nn.MultiheadAttention), no layer swap."""

    def __init__(self, vocab: int = 40, dim: int = 16, classes: int = 3, seq_len: int = 7) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(seq_len, dim) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.position[: tokens.shape[1]])
        return self.head(h.mean(dim=1))


class LSTMClassifier(nn.Module):
    def __init__(self, d_in: int = 5, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def make_case(name: str, batch: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A freshly initialised model of architecture ``name`` and a random batch (inputs, labels) for it."""
    torch.manual_seed(seed)
    labels = torch.randint(0, 3, (batch,))
    if name == "mlp":
        return MLP(), torch.randn(batch, 10), labels
    if name == "cnn_groupnorm":
        return GroupNormCNN(), torch.randn(batch, 1, 8, 8), labels
    if name == "embedding_conv1d":
        return TextConv(), torch.randint(0, 50, (batch, 9)), labels
    if name == "transformer":
        return TransformerClassifier(), torch.randint(0, 40, (batch, 7)), labels
    if name == "lstm":
        return LSTMClassifier(), torch.randn(batch, 6, 5), labels
    raise ValueError(name)


ARCHITECTURES = ("mlp", "cnn_groupnorm", "embedding_conv1d", "transformer", "lstm")


def brute_force_clipped_sum(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, max_grad_norm: float
) -> list[torch.Tensor]:
    """sum_i clip(g_i) by a plain per-example loop: one forward/backward per example (the obviously-correct reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(inputs)):
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs[i : i + 1]), labels[i : i + 1]).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, max_grad_norm / norm.item())
        for t, g in zip(total, grads):
            t += factor * g
    model.zero_grad()
    return total


def train_one_epoch(model: nn.Module, optimizer, loader) -> None:
    """One pass over a private loader with a cross-entropy loss, as Opacus' examples train (an empty Poisson batch
    still takes its step)."""
    for x, y in loader:
        optimizer.zero_grad()
        if len(y):
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
