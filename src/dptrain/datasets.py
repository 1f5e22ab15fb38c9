"""Data that ships with the installed packages: scikit-learn's handwritten digits (real data, no download).

The demo, ``dptrain train`` with ``[dataset] name = "digits"`` and the digits audit all load it here. Pixels are
scaled by their known range (0..16), never by statistics of the data, so preprocessing spends no privacy.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

DIGITS_PIXEL_MAX = 16.0
DIGITS_FEATURES, DIGITS_CLASSES = 64, 10


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """Stratified split of the 1797 digits (80/20 by default), pixels scaled to [0, 1] by the known range."""
    try:  # scikit-learn takes about a second to import: only the digits need it
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ValueError(
            "the digits dataset ships with scikit-learn, which is not installed: pip install scikit-learn"
        ) from e

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )

    def to_dataset(features, labels) -> TensorDataset:
        return TensorDataset(
            torch.tensor(features / DIGITS_PIXEL_MAX, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)
        )

    return to_dataset(x_train, y_train), to_dataset(x_test, y_test)
