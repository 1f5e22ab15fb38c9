"""Auditing a digits MLP (64-128-10 ReLU on scikit-learn's digits): data with canaries, and training functions.

``make_digits_train_fn(epsilon)`` returns a ``TrainFn``: ``train_fn(dataset) -> (model, claimed_epsilon)``, the
interface every audit in ``dptrain.audit`` takes. With ``epsilon=None`` it trains without privacy (the claimed eps is
infinite); otherwise it runs DP-Adam with dptrain's ``PrivacyEngine`` and Poisson sampling, as a user would, and
claims ``engine.get_epsilon(delta)``, the engine's own accounting.

``digits_audit_data(num_canaries)`` holds ``num_canaries`` examples of the training split out as the canary pool and
gives them random wrong labels (``mislabeled_canaries``); the rest of the training split is the real training set
and the test split stays held out. Mislabelled real digits are natural "outlier" canaries: a model that memorises
gives them away, while a model that only learns what many examples share does not.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dptrain.accounting import calibrate_noise
from dptrain.audit.gradient_canaries import GradientCanaries
from dptrain.audit.one_run import CanarySet, TrainFn, mislabeled_canaries
from dptrain.datasets import DIGITS_CLASSES, DIGITS_FEATURES, load_digits_split
from dptrain.engine import PrivacyEngine



def digits_mlp(hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(DIGITS_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, DIGITS_CLASSES))


def digits_audit_data(num_canaries: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset, CanarySet]:
    """(real training set, test set, canaries): ``num_canaries`` training-split examples become mislabelled canaries."""
    train, test = load_digits_split()
    x, y = train.tensors
    if not 0 < num_canaries < len(y):
        raise ValueError(f"num_canaries must be in [1, {len(y) - 1}], got {num_canaries}")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    pool, rest = order[:num_canaries], order[num_canaries:]
    canaries = mislabeled_canaries(TensorDataset(x[pool], y[pool]), num_canaries, DIGITS_CLASSES, seed=seed)
    return TensorDataset(x[rest], y[rest]), test, canaries


@functools.lru_cache(maxsize=64)
def _noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    # Calibration costs seconds (PLD bisection); shadow models of equal size share it.
    return calibrate_noise(epsilon, delta, sample_rate, steps, "pld")


def make_digits_train_fn(
    epsilon: float | None,
    *,
    delta: float = 1e-5,
    epochs: int = 60,
    batch_size: int = 256,
    lr: float = 0.01,
    max_grad_norm: float = 1.0,
    hidden: int = 128,
    seed: int = 0,
) -> TrainFn:
    """A ``TrainFn`` for the audit's digits MLP: non-private Adam when ``epsilon`` is None, else DP-Adam at ``epsilon``.

    The private path is ``make_private_with_epsilon`` spelled out (sample rate 1 / len(loader), ``epochs`` epochs,
    noise calibrated by ``dptrain.accounting.calibrate_noise``) so that the calibration can be cached.
    """

    def train(dataset: Dataset, gradient_canaries: GradientCanaries | None = None) -> tuple[nn.Module, float]:
        """Train on ``dataset``; with ``gradient_canaries`` (private runs only) they ride along, white-box."""
        torch.manual_seed(seed)
        model = digits_mlp(hidden)
        if gradient_canaries is not None:
            if epsilon is None:
                raise ValueError("gradient canaries audit the DP engine: a non-private run has none to audit")
            gradient_canaries.attach(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        loss_fn = nn.CrossEntropyLoss()
        engine = None
        if epsilon is None:
            loader = DataLoader(
                dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
            )
        else:
            loader = DataLoader(dataset, batch_size=batch_size)
            sigma = _noise_multiplier(float(epsilon), delta, 1.0 / len(loader), epochs * len(loader))
            engine = PrivacyEngine()
            model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=sigma,
                max_grad_norm=max_grad_norm,
                noise_generator=torch.Generator().manual_seed(seed),
            )
            if gradient_canaries is not None:
                gradient_canaries.watch(optimizer)
        model.train()
        for _ in range(epochs):
            for x, y in loader:
                if len(y) == 0:
                    optimizer.zero_grad()
                    optimizer.step()  # an empty Poisson batch: the step (noise only) still happens
                    continue
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
        model.eval()
        claimed = math.inf if engine is None else engine.get_epsilon(delta)
        return model, claimed

    return train
