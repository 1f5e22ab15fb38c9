"""Text generation and sequence scoring for a (DP-)trained causal LM with dptrain's ``SimpleTokenizer`` (or any
tokenizer with ``encode``/``decode``/``eos_token_id``).

Generating from a DP-trained model is post-processing: it costs no privacy budget. The engine's hooks stay
attached but record nothing here (everything runs under ``torch.no_grad``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dptrain.lm.loss import token_log_likelihoods


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _EvalMode:
    """Evaluation mode and no gradients for the duration; the model's train/eval mode is restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 50,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_at_eos: bool = True,
) -> str:
    """The text the model writes after ``prompt`` (the continuation only, without the prompt).

    ``greedy=True`` takes the most likely token at every step (deterministic: the extraction attack). Otherwise
    tokens are sampled from softmax(logits / ``temperature``), restricted to the ``top_k`` most likely if given,
    with ``generator`` for reproducibility. Stops after ``max_new_tokens`` or at the end-of-text token.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    ids = list(tokenizer.encode(prompt))
    prompt_length = len(ids)
    limit = _max_positions(model)
    eos = getattr(tokenizer, "eos_token_id", None)
    device = _model_device(model)
    with _EvalMode(model):
        for _ in range(max_new_tokens):
            context = ids[-limit:] if limit else ids
            logits = _logits(model, torch.tensor([context], device=device))[0, -1].float()
            if greedy:
                next_id = int(torch.argmax(logits))
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_id = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            ids.append(next_id)
            if stop_at_eos and eos is not None and next_id == eos:
                break
    return tokenizer.decode(ids[prompt_length:])


def _pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def continuation_log_likelihoods(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    continuations: Sequence[str],
    batch_size: int = 512,
) -> np.ndarray:
    """log p(continuation | prompt) for each continuation: the sum of the log-probabilities of its tokens."""
    prompt_ids = list(tokenizer.encode(prompt))
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    device = _model_device(model)
    out = np.empty(len(continuations), dtype=np.float64)
    with _EvalMode(model):
        for start in range(0, len(continuations), batch_size):
            chunk = continuations[start : start + batch_size]
            encoded = [prompt_ids + list(tokenizer.encode(c, add_special_tokens=False)) for c in chunk]
            ids, mask = _pad(encoded, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            token_ll = token_log_likelihoods(_logits(model, ids, mask), ids, mask)
            # token_ll[:, t] scores token t + 1: the continuation's tokens are t >= len(prompt_ids) - 1.
            out[start : start + len(chunk)] = token_ll[:, len(prompt_ids) - 1 :].sum(1).double().cpu().numpy()
    return out


def log_likelihood_fn(
    model: nn.Module, tokenizer: Any, prompt: str, batch_size: int = 512
) -> Callable[[Sequence[str]], np.ndarray]:
    """``log_likelihood_fn`` for ``dptrain.audit.canary_exposure``: each candidate ``prompt + rest`` is scored by
    log p(rest | prompt) (the prompt's own term is the same for every candidate and does not change ranks)."""

    def score(candidates: Sequence[str]) -> np.ndarray:
        rests = []
        for c in candidates:
            if not c.startswith(prompt):
                raise ValueError(f"candidate {c!r} does not start with the prompt {prompt!r}")
            rests.append(c[len(prompt) :])
        return continuation_log_likelihoods(model, tokenizer, prompt, rests, batch_size)

    return score
