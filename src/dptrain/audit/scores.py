"""Per-example membership scores of a classifier: higher means "more likely trained on".

- ``"loss"``: minus the cross-entropy loss, -log p_y (Yeom et al., CSF 2018: members have lower loss).
- ``"logit"``: the LiRA score of Carlini et al. (S&P 2022), log p_y - log sum_{y' != y} p_y', the logit of the
  model's confidence in the true label. It equals z_y - logsumexp_{y' != y} z_y' for logits z, computed that way
  so that it stays finite when p_y rounds to 1; its distribution over training runs is close to Gaussian, which
  is what LiRA fits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

SCORES = ("loss", "logit")


def logit_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p_y - log sum_{y' != y} p_y' from logits (n x classes) and labels (n)."""
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1), float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def loss_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the per-example cross-entropy loss."""
    return -nn.functional.cross_entropy(logits, labels, reduction="none")


@torch.no_grad()
def score_examples(model: nn.Module, dataset: Dataset, score: str = "loss", batch_size: int = 1024) -> np.ndarray:
    """The ``score`` of every (input, label) example of ``dataset`` under ``model`` (put in eval mode), as float64.

    Inputs are moved to the device of the model's first parameter; the model's training mode is restored afterwards.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    fn = loss_scores if score == "loss" else logit_scores
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        out = []
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            logits = model(x.to(device)).double()
            y = y.to(device)
            out.append(fn(logits, y.long()).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()
