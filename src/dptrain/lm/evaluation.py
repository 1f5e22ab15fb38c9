"""Evaluating a causal LM: perplexity (exact, or released with user-level DP), canary exposure and extraction.

**Evaluation on private data is a release too.** A validation perplexity computed on real users' conversations
tells something about them; :func:`private_validation_perplexity` releases it with user-level DP (a Gaussian
mechanism on clipped per-user losses) so that it can be charged to the same privacy budget as fine-tuning.
:func:`validation_perplexity` is the exact value, for synthetic data and for analysis only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dptrain.audit.exposure import canary_exposure
from dptrain.lm.data import trim_padding
from dptrain.lm.generation import _EvalMode, generate, log_likelihood_fn
from dptrain.lm.loss import token_log_likelihoods
from dptrain.randomness import RandomSource


def _batches(dataset: Dataset, batch_size: int):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def per_example_token_losses(
    model: nn.Module, dataset: Dataset, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Each example's summed next-token loss and its number of predicted tokens (two arrays of len(dataset))."""
    sums, counts = [], []
    with _EvalMode(model):
        for input_ids, attention_mask in _batches(dataset, batch_size):
            input_ids, attention_mask = trim_padding(input_ids, attention_mask)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            ll = token_log_likelihoods(logits, input_ids, attention_mask)
            sums.append((-ll.sum(1)).double().numpy())
            counts.append(attention_mask[:, 1:].sum(1).numpy())
    return np.concatenate(sums), np.concatenate(counts)


def validation_perplexity(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """exp(total next-token loss / total predicted tokens) over ``dataset``: exact, not private."""
    sums, counts = per_example_token_losses(model, dataset, batch_size)
    return float(math.exp(sums.sum() / max(counts.sum(), 1)))


@dataclass(frozen=True)
class PrivatePerplexity:
    """A validation perplexity released with user-level DP.

    ``perplexity`` = exp(noisy mean over users of each user's mean token loss, clipped to [0, ``loss_bound``]);
    ``noise_multiplier`` is that of one Gaussian mechanism of L2 sensitivity 1 per user (what the ledger records,
    with sampling rate 1 and one step); ``noise_std`` is the standard deviation of the noisy mean loss (nats), to
    first order, computed from released quantities only.
    """

    perplexity: float
    mean_loss: float
    noise_multiplier: float
    loss_bound: float
    noise_std: float

    def to_dict(self) -> dict[str, float]:
        return {
            "perplexity": self.perplexity,
            "mean_loss": self.mean_loss,
            "noise_multiplier": self.noise_multiplier,
            "loss_bound": self.loss_bound,
            "noise_std": self.noise_std,
        }


def private_validation_perplexity(
    model: nn.Module,
    dataset: Dataset,
    user_ids: Sequence[int],
    noise_multiplier: float,
    loss_bound: float = 2.0,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    random: RandomSource | None = None,
) -> PrivatePerplexity:
    """Validation perplexity with user-level (add/remove one user) DP: a Gaussian mechanism on two sums.

    Each user u contributes v_u = (min(l_u, B) / B, 1) / sqrt(2), where l_u is the mean token loss over u's
    examples and B = ``loss_bound``: ||v_u|| <= 1 whatever u's data, so adding or removing a user moves the vector
    sum by at most 1. The release is sum_u v_u + N(0, sigma^2 I_2) with sigma = ``noise_multiplier``, and the mean
    loss is B * (noisy loss sum) / (noisy count). Record it as one step of sampling rate 1 and noise multiplier
    sigma (``BudgetLedger.spend(budget, 1.0, sigma, 1)``). Losses above B are clipped, which biases the estimate
    down for a poor model; pick B above the losses you expect (the same for every release, fixed in advance).

    The noise comes from ``random`` (e.g. the training engine's source, ``RandomSource(secure=True)`` for a secure
    run), else from ``generator`` (a seeded release, reproducible), else from a generator seeded by the OS: never
    from torch's global generator, which scripts seed alike every time.
    """
    if random is not None and generator is not None:
        raise ValueError("pass the noise's random source or a generator, not both")
    if not loss_bound > 0:
        raise ValueError(f"loss_bound must be > 0, got {loss_bound}")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 for a private release, got {noise_multiplier}")
    sums, counts = per_example_token_losses(model, dataset, batch_size)
    users = np.asarray(list(user_ids))
    if len(users) != len(sums):
        raise ValueError(f"user_ids has {len(users)} entries for {len(sums)} examples")
    unique, inverse = np.unique(users, return_inverse=True)
    user_loss = np.bincount(inverse, weights=sums) / np.maximum(np.bincount(inverse, weights=counts), 1)
    clipped = np.minimum(user_loss, loss_bound) / loss_bound
    scale = 1.0 / math.sqrt(2.0)
    source = random if random is not None else RandomSource(generator=generator)
    noise = source.normal(torch.Size([2]), torch.float64, torch.device("cpu")).numpy() * noise_multiplier
    noisy_sum = clipped.sum() * scale + noise[0]
    noisy_count = len(unique) * scale + noise[1]
    mean = float(np.clip(loss_bound * noisy_sum / max(noisy_count, scale), 0.0, loss_bound))
    # Delta method for B * (s + e1) / (n + e2) with s = sum of clipped losses / B, n = count (both scaled by 1/sqrt 2).
    # Released quantities only (the noisy count, not the true number of users, which is private).
    std = loss_bound * noise_multiplier * math.sqrt(1.0 + (mean / loss_bound) ** 2) / max(noisy_count, scale)
    return PrivatePerplexity(math.exp(mean), mean, float(noise_multiplier), float(loss_bound), float(std))


def canary_report(
    model: nn.Module,
    tokenizer: Any,
    canary: Any,
    *,
    num_samples: int = 2000,
    exact_limit: int = 100_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Exposure of ``canary`` (a :class:`dptrain.lm.corpus.Canary`, or anything with ``prompt``, ``secret``,
    ``text`` and ``secret_format``) and whether greedy decoding from its prompt emits the secret."""
    result = canary_exposure(
        log_likelihood_fn(model, tokenizer, canary.prompt),
        canary.text,
        canary.secret_format,
        num_samples=num_samples,
        exact_limit=exact_limit,
        seed=seed,
    )
    completion = generate(model, tokenizer, canary.prompt, max_new_tokens=len(canary.secret) + 1, greedy=True)
    return {
        "name": getattr(canary, "name", canary.secret),
        "repeats": getattr(canary, "repeats", None),
        "exposure": result.exposure,
        "exposure_interval": list(result.exposure_interval),
        "max_exposure": math.log2(result.space_size),
        "rank": result.rank,
        "method": result.method,
        "extracted": completion.startswith(f" {canary.secret}"),
        "greedy_completion": completion,
    }
