"""Training loops for causal LMs: non-private, and DP-SGD with dptrain's engine (example- or user-level).

These are what the memorisation experiment runs; they are also a compact reference for your own loop. The one
thing that differs from ordinary LM training is the loss: :func:`dptrain.lm.causal_lm_loss`, each example's mean
token loss averaged over the batch, never a batch-wide token mean (see its docstring).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dptrain.engine import PrivacyEngine
from dptrain.lm.data import trim_padding
from dptrain.lm.loss import causal_lm_loss
from dptrain.lm.models import trainable_parameters
from dptrain.randomness import RandomSource
from dptrain.rundir import json_number


@dataclass
class PrivacySettings:
    """DP-SGD settings for :func:`train_causal_lm`.

    ``target_epsilon`` at ``delta`` for the whole run (the noise multiplier is calibrated for ``epochs`` epochs);
    ``privacy_unit="user"`` with one user id per example protects users (``user_reduction`` "sum" or "mean" of a
    user's example gradients is clipped as one unit), "example" protects single examples. ``expected_units`` per
    step sets the sampling rate q = expected_units / (number of users, or of examples). ``ledger`` and ``budget``
    charge the run to a :class:`dptrain.budget.BudgetLedger` budget (reserved before the first step, settled after).
    ``secure_mode`` draws sampling and noise from the OS's cryptographic generator; otherwise they come from a
    generator seeded with the run's ``seed`` (reproducible experiments, not for production releases).
    """
    target_epsilon: float
    delta: float
    max_grad_norm: float = 1.0
    privacy_unit: str = "user"
    user_reduction: str = "sum"
    expected_units: float = 64.0
    max_physical_batch_size: int | None = 64
    ledger: Any = None
    budget: str | None = None
    grad_sample_mode: str = "auto"
    secure_mode: bool = False


@dataclass
class TrainingResult:
    """What a training run did: steps, seconds, its claimed epsilon (inf without DP) and the DP settings used."""
    steps: int
    seconds: float
    epsilon: float = math.inf
    delta: float | None = None
    noise_multiplier: float = 0.0
    sample_rate: float | None = None
    privacy_unit: str | None = None
    losses: list[float] = field(default_factory=list)  # per epoch, only when asked for (see train_causal_lm)
    # The DP run's noise source (None without DP): later releases about the same data draw from it, so a secure run
    # stays secure and a seeded run stays one stream (never a second generator seeded from a published seed).
    random: RandomSource | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "seconds": self.seconds,
            "epsilon": json_number(self.epsilon),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "privacy_unit": self.privacy_unit,
        }


def _lm_step_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    input_ids, attention_mask = trim_padding(input_ids, attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return causal_lm_loss(logits, input_ids, attention_mask)


def train_causal_lm(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    user_ids: Sequence[int] | torch.Tensor | None = None,
    privacy: PrivacySettings | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    training_loss: bool | None = None,
) -> TrainingResult:
    """Train ``model`` (its trainable parameters, e.g. LoRA adapters) with Adam on ``dataset`` of
    ``(input_ids, attention_mask)`` for ``epochs`` epochs.

    Without ``privacy``: shuffled batches of ``batch_size``. With ``privacy``: dptrain's ``PrivacyEngine`` with
    Poisson sampling (of users when ``privacy.privacy_unit == "user"``, which needs ``user_ids``), the noise
    calibrated to ``privacy.target_epsilon``. Empty Poisson batches skip the forward pass (the engine still adds the
    step's noise). The model is left in train mode with the engine's hooks attached.

    ``training_loss``: record each epoch's mean training loss in ``result.losses`` and ``log`` it. It is a
    statistic of the training data computed without noise, so under DP it is off by default (None: on without
    ``privacy`` only); turned on, it is outside the guarantee and says so in the log.
    """
    if training_loss is None:
        training_loss = privacy is None
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer: Any = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    engine = None
    result = TrainingResult(steps=0, seconds=0.0)
    if privacy is None:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    else:
        if privacy.privacy_unit == "user" and user_ids is None:
            raise ValueError('privacy_unit="user" needs user_ids: the user of each example of the dataset')
        if not privacy.expected_units > 0:
            raise ValueError(f"expected_units must be > 0, got {privacy.expected_units}")
        units = len(dataset) if privacy.privacy_unit == "example" else len(set(torch.as_tensor(user_ids).tolist()))
        steps_per_epoch = max(1, round(units / privacy.expected_units))
        plain = DataLoader(dataset, batch_size=math.ceil(len(dataset) / steps_per_epoch))
        engine = PrivacyEngine(ledger=privacy.ledger, budget=privacy.budget, secure_mode=privacy.secure_mode)
        user_kwargs = (
            {"privacy_unit": "user", "user_ids": user_ids, "user_reduction": privacy.user_reduction}
            if privacy.privacy_unit == "user"
            else {}
        )
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=plain,
            target_epsilon=privacy.target_epsilon,
            target_delta=privacy.delta,
            epochs=epochs,
            max_grad_norm=privacy.max_grad_norm,
            max_physical_batch_size=privacy.max_physical_batch_size,
            noise_generator=None if privacy.secure_mode else generator,
            grad_sample_mode=privacy.grad_sample_mode,
            **user_kwargs,
        )
        result.noise_multiplier = optimizer.noise_multiplier
        result.random = optimizer.random
        result.sample_rate = optimizer.sample_rate
        result.privacy_unit = privacy.privacy_unit
        result.delta = privacy.delta
    model.train()
    start = time.perf_counter()
    try:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for input_ids, attention_mask in loader:
                optimizer.zero_grad()
                if input_ids.shape[0] > 0:
                    loss = _lm_step_loss(model, input_ids, attention_mask)
                    loss.backward()
                    if training_loss:
                        total, count = total + loss.item() * input_ids.shape[0], count + input_ids.shape[0]
                optimizer.step()  # DP: one real step per logical batch, after its last physical chunk
            if training_loss:
                result.losses.append(total / max(count, 1))
                outside = " (outside the DP guarantee: computed without noise)" if privacy is not None else ""
                if log is not None:
                    log(f"  epoch {epoch + 1}/{epochs}: mean training loss {result.losses[-1]:.4f}{outside}")
            elif log is not None:
                log(f"  epoch {epoch + 1}/{epochs} done")
    finally:
        result.seconds = time.perf_counter() - start
        if engine is not None:
            engine.close()  # settles the ledger reservation to the steps taken
    if engine is not None:
        result.steps = optimizer.steps_taken
        result.epsilon = engine.get_epsilon(privacy.delta)
    else:
        result.steps = epochs * len(loader)
    return result
