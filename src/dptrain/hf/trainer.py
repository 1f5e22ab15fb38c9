"""``DPTrainer``: a ``transformers.Trainer`` whose training is DP-SGD through dptrain's engine.

What it changes in the Trainer, and why:
- the training data loader is the engine's: Poisson sampling of the train set (of users, with ``user_column`` or
  ``user_ids``: each user's examples together, their summed gradient clipped as one unit), with
  ``per_device_train_batch_size`` the expected number of units (users, or examples) per step; the noise is calibrated to ``target_epsilon`` at ``delta`` for
  ``num_train_epochs`` epochs;
- the loss is each example's mean token loss over its own predicted tokens (``dptrain.lm.causal_lm_loss``); the
  model is called without ``labels``, whose loss is a token mean over the whole batch with weights that depend on
  the other examples (the engine would refuse it at the first step);
- the optimizer the Trainer creates is wrapped by the engine (clipping, noise, accounting); the Trainer's own
  gradient clipping (``max_grad_norm``) would act on gradients the engine does not use, so it must be 0;
- logs carry ``epsilon`` (and the progress bar with them); numbers about the training data computed without noise
  (the training loss, the raw gradient norm, token counts, FLOPs) are removed from logs and results unless
  ``training_loss=True`` (then they are outside the guarantee);
- with a ``ledger`` and ``budget`` the run is reserved before its first step: with ``target_epsilon`` the whole
  planned run (refused if it does not fit), with ``noise_multiplier`` the steps that still fit, and training stops
  at the step the budget allows (``should_training_stop``).
The model keeps its class and ``state_dict`` keys: ``save_model`` writes what plain transformers (or peft, for
LoRA adapters) loads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback

from dptrain import PrivacyEngine
from dptrain.lm import causal_lm_loss, trim_padding

#: Log and metric keys that are statistics of the training data computed without noise.
PRIVATE_LOG_KEYS = ("loss", "grad_norm", "train_loss", "total_flos", "num_input_tokens_seen", "train_tokens_per_second")


class _StopAtBudget(TrainerCallback):
    def __init__(self, trainer: "DPTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.budget_exhausted:
            control.should_training_stop = True
        return control


class DPTrainer(Trainer):
    """``Trainer(model, args, train_dataset, ...)`` plus the privacy settings; ``epsilon`` after (or during)
    training. The dataset's items: dicts with ``input_ids`` and ``attention_mask`` (and optionally ``labels``, and
    the ``user_column``), or ``(input_ids, attention_mask)`` pairs as ``dptrain.lm.lm_dataset`` makes them."""

    def __init__(
        self,
        *args: Any,
        target_epsilon: float | None = None,
        delta: float,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        user_column: str | None = None,
        user_ids: Any = None,
        user_reduction: str = "sum",
        ledger: Any = None,
        budget: str | None = None,
        secure_mode: bool = False,
        training_loss: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.args.max_grad_norm not in (0, None):
            raise ValueError(
                f"TrainingArguments(max_grad_norm={self.args.max_grad_norm}) clips the batch gradient, which DP-SGD "
                "does not use: set it to 0; DPTrainer(max_grad_norm=...) is the per-example clipping norm"
            )
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "gradient_accumulation_steps must be 1: each optimizer step is one Poisson batch; raise "
                "per_device_train_batch_size (the expected batch) instead"
            )
        if self.args.max_steps > 0 or float(self.args.num_train_epochs) != int(self.args.num_train_epochs):
            raise ValueError("DPTrainer calibrates the noise for a whole number of epochs: set num_train_epochs to "
                             "an integer and leave max_steps unset")
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError("give target_epsilon (the noise is calibrated to it for num_train_epochs) or "
                             "noise_multiplier (with a budget: training stops at the step the budget allows)")
        if user_column is not None and user_ids is not None:
            raise ValueError("give the users as user_column or as user_ids, not both")
        self.target_epsilon, self.delta, self.dp_max_grad_norm = target_epsilon, delta, max_grad_norm
        self.noise_multiplier = noise_multiplier
        self.user_column, self.user_ids, self.user_reduction = user_column, user_ids, user_reduction
        self.training_loss = training_loss
        self.engine = PrivacyEngine(ledger=ledger, budget=budget, secure_mode=secure_mode)
        self.engine.on_budget_exhausted = self._on_budget_exhausted
        self.budget_exhausted = False
        self._private_loader: DataLoader | None = None
        self.add_callback(_StopAtBudget(self))

    def _on_budget_exhausted(self, engine: PrivacyEngine) -> None:
        self.budget_exhausted = True

    @property
    def epsilon(self) -> float:
        """The run's epsilon at ``delta`` so far (per user with users)."""
        return self.engine.get_epsilon(self.delta)

    def _users(self, dataset: Dataset) -> Any:
        if self.user_column is None:
            return self.user_ids
        try:
            return [int(dataset[i][self.user_column]) for i in range(len(dataset))]
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"user_column={self.user_column!r}: every item must be a dict with that key") from error

    def _collate(self, items: list) -> dict[str, torch.Tensor]:
        if items and not isinstance(items[0], dict):  # (input_ids, attention_mask) pairs
            items = [{"input_ids": ids, "attention_mask": mask} for ids, mask in items]
        # (the Trainer's collator: the user's, or transformers' default_data_collator)
        return self.data_collator([{k: v for k, v in item.items() if k != self.user_column} for item in items])

    def get_train_dataloader(self) -> DataLoader:
        """The engine's private loader (made once, with the wrapped optimizer)."""
        if self._private_loader is not None:
            return self._private_loader
        if self.train_dataset is None:
            raise ValueError("DPTrainer needs a train_dataset")
        users = self._users(self.train_dataset)
        # per_device_train_batch_size is the expected number of privacy units (users, or examples) per step
        units = len(set(torch.as_tensor(users).tolist())) if users is not None else len(self.train_dataset)
        steps_per_epoch = max(1, round(units / self.args.per_device_train_batch_size))
        plain = DataLoader(self.train_dataset, batch_size=math.ceil(len(self.train_dataset) / steps_per_epoch),
                           collate_fn=self._collate)  # fmt: skip
        self.create_optimizer()
        user_kwargs = {"privacy_unit": "user", "user_ids": users, "user_reduction": self.user_reduction} if users is not None else {}
        common = dict(module=self.model, optimizer=self.optimizer, data_loader=plain, max_grad_norm=self.dp_max_grad_norm,
                      **user_kwargs)  # fmt: skip
        if self.noise_multiplier is not None:  # the ledger reserves the steps that still fit
            made = self.engine.make_private(noise_multiplier=self.noise_multiplier, **common)
        else:
            made = self.engine.make_private_with_epsilon(
                target_epsilon=self.target_epsilon, target_delta=self.delta, epochs=int(self.args.num_train_epochs),
                **common,
            )
        self.model, self.optimizer, self._private_loader = made
        return self._private_loader

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not inputs or len(inputs["input_ids"]) == 0:  # an empty Poisson batch: the step adds noise only
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Each example's mean loss over its own predicted tokens, then the mean over examples."""
        input_ids, attention_mask = trim_padding(inputs["input_ids"], inputs["attention_mask"])
        labels = inputs.get("labels")
        labels = labels[:, : input_ids.shape[1]] if labels is not None else input_ids
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
        loss = causal_lm_loss(outputs.logits, labels, attention_mask)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs = dict(logs)
        if self.engine.accountant.steps:
            logs["epsilon"] = self.epsilon
        if not self.training_loss:
            for key in PRIVATE_LOG_KEYS:
                logs.pop(key, None)
        super().log(logs, start_time)

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; its result without the noiseless training statistics (unless ``training_loss``),
        with ``epsilon`` in its metrics. The ledger reservation is settled at the end."""
        try:
            output = super().train(*args, **kwargs)
        finally:
            self.engine.close()
        metrics = dict(output.metrics)
        metrics["epsilon"] = self.epsilon
        if self.training_loss:
            return output._replace(metrics=metrics)
        for key in PRIVATE_LOG_KEYS:
            metrics.pop(key, None)
        return output._replace(training_loss=math.nan, metrics=metrics)
