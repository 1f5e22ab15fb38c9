"""A run's model (an MLP from ``[model]``), its description for the card, and its held-out loss and accuracy."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.app.config import ModelConfig


def build_model(num_features: int, num_classes: int, config: ModelConfig) -> nn.Module:
    activation = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU, "silu": nn.SiLU}[config.activation]
    layers: list[nn.Module] = []
    width = num_features
    for size in config.hidden:
        layers += [nn.Linear(width, size), activation()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def describe_model(num_features: int, num_classes: int, config: ModelConfig) -> str:
    sizes = "-".join(str(s) for s in (num_features, *config.hidden, num_classes))
    return f"MLP {sizes} ({config.activation})" if config.hidden else f"linear model {num_features}-{num_classes}"


def evaluate(model: nn.Module, dataset: TensorDataset) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``dataset``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x, y = dataset.tensors
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y).item()
            acc = (logits.argmax(dim=1) == y).float().mean().item()
    finally:
        model.train(was_training)
    return loss, acc
