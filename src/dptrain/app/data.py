"""A run's data: scikit-learn's digits or a CSV file whose features are scaled by *declared* ranges (never by
statistics of the private data), split into training and held-out examples."""

from __future__ import annotations

import csv
import hmac
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dptrain.app.config import ConfigError, DatasetConfig
from dptrain.datasets import DIGITS_PIXEL_MAX, load_digits_split


class DataRangeWarning(UserWarning):
    """CSV values outside their declared ``feature_ranges``: clipped to the range."""


@dataclass
class LoadedData:
    train: TensorDataset
    test: TensorDataset
    info: dict[str, Any]


def load_dataset(config: DatasetConfig) -> LoadedData:
    """The train and held-out splits of ``config``'s dataset with a description for the report and card."""
    if config.name == "digits":
        train, test = load_digits_split(seed=config.split_seed, test_fraction=config.test_fraction)
        info = {
            "name": "digits",
            "source": "scikit-learn load_digits (UCI optical recognition of handwritten digits), shipped with "
            "scikit-learn",
            "preprocessing": f"pixels divided by their known maximum {DIGITS_PIXEL_MAX:g}",
            "num_classes": 10,
            "declared_ranges": {"every pixel": [0.0, DIGITS_PIXEL_MAX]},
        }
    else:
        train, test, info = _load_csv(config)
    low, high = config.scale_to
    if (low, high) != (0.0, 1.0):
        for dataset in (train, test):
            x = dataset.tensors[0]
            x.mul_(high - low).add_(low)
        info["preprocessing"] += f", then mapped linearly from [0, 1] onto [{low:g}, {high:g}]"
    info["preprocessing"] += " (no statistics of the data used)"
    info.update(
        num_train=len(train), num_test=len(test), num_examples=len(train) + len(test),
        num_features=int(train.tensors[0].shape[1]), test_fraction=config.test_fraction, split_seed=config.split_seed,
    )
    return LoadedData(train, test, info)


def fingerprint(dataset: TensorDataset, key: bytes) -> str:
    """HMAC-SHA256 of a dataset's tensors as loaded (features, then labels) under ``key``.

    The privacy card records this fingerprint of the training data (GDPR Art. 30: which data a model was trained
    on). A plain hash would let anyone who knows every record but one test guesses of the last against the card;
    keyed with a random secret kept in the private ``run.json``, only the data's owner can recompute it."""
    digest = hmac.new(key, digestmod="sha256")
    for tensor in dataset.tensors:
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return "hmac-sha256:" + digest.hexdigest()


def _load_csv(config: DatasetConfig) -> tuple[TensorDataset, TensorDataset, dict[str, Any]]:
    source = str(config.path)
    try:
        with open(config.path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [row for row in reader if row]
    except FileNotFoundError:
        raise ConfigError([f"[dataset] path: no such file {config.path}"], source) from None
    if not header:
        raise ConfigError([f"[dataset] {config.path} is empty (a header row is needed)"], source)
    header = [h.strip() for h in header]
    errors: list[str] = []
    if config.label_column not in header:
        errors.append(f"[dataset] label_column {config.label_column!r} is not a column of {config.path}: {header}")
    features = list(config.features or [h for h in header if h != config.label_column])
    for name in features:
        if name not in header:
            errors.append(f"[dataset] feature {name!r} is not a column of {config.path}: {header}")
    ranges = dict(config.feature_ranges or {})
    for name in ranges:
        if name not in features:
            errors.append(f"[dataset] feature_ranges.{name}: no such feature (features: {features})")
    missing = [f for f in features if f not in ranges and config.feature_range is None]
    if missing:
        errors.append(
            f"[dataset] no known range for features {missing}: add them to feature_ranges or set feature_range"
        )
    if not rows:
        errors.append(f"[dataset] {config.path} has no data rows")
    if errors:
        raise ConfigError(errors, source)
    columns = [header.index(f) for f in features]
    label_index = header.index(config.label_column)
    class_ids = {str(c): i for i, c in enumerate(config.classes)}
    x = np.empty((len(rows), len(features)), dtype=np.float64)
    y = np.empty(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            errors.append(f"{config.path} line {line}: {len(row)} fields, the header has {len(header)}")
        else:
            label = row[label_index].strip()
            if label not in class_ids:
                errors.append(
                    f"{config.path} line {line}: label {label!r} is not one of classes {list(config.classes)}"
                )
            else:
                y[r] = class_ids[label]
            for j, c in enumerate(columns):
                try:
                    x[r, j] = float(row[c])
                except ValueError:
                    errors.append(
                        f"{config.path} line {line}, column {features[j]!r}: {row[c]!r} is not a number (a "
                        "categorical column must be encoded as numbers first, or left out of [dataset] features)"
                    )
                else:
                    if not math.isfinite(x[r, j]):
                        errors.append(f"{config.path} line {line}, column {features[j]!r}: {row[c]!r} is not finite")
        if len(errors) >= 10:
            errors.append("(stopped after 10 errors)")
            break
    if errors:
        raise ConfigError(errors, source)
    low = np.array([ranges.get(f, config.feature_range)[0] for f in features])
    high = np.array([ranges.get(f, config.feature_range)[1] for f in features])
    outside = ((x < low) | (x > high)).sum(axis=0)
    if outside.any():
        # For the operator loading their own data (not written to the run's files): a declared range that does not
        # hold clips real values, which costs accuracy silently.
        counts = ", ".join(f"{f} {int(n)}" for f, n in zip(features, outside) if n)
        warnings.warn(
            f"{config.path}: values outside their declared range were clipped to it (of {len(rows)} rows: "
            f"{counts}); widen feature_ranges if the range was wrong", DataRangeWarning, stacklevel=2,
        )  # fmt: skip
    x = np.clip((x - low) / (high - low), 0.0, 1.0)
    order = np.random.default_rng(config.split_seed).permutation(len(rows))
    num_test = min(len(rows) - 1, max(1, round(len(rows) * config.test_fraction)))
    test_idx, train_idx = order[:num_test], order[num_test:]

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(x[idx], dtype=torch.float32), torch.tensor(y[idx], dtype=torch.long))

    info = {
        "name": Path(config.path).name,
        "source": f"CSV file {config.path}, label column {config.label_column!r}",
        "preprocessing": "each feature scaled to [0, 1] by its declared range and clipped to it",
        "num_classes": len(config.classes),
        "declared_ranges": {f: [float(lo), float(hi)] for f, lo, hi in zip(features, low, high)},
    }
    return subset(train_idx), subset(test_idx), info
