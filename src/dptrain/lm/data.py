"""Turning texts into fixed-length padded tensors for causal-LM training, and trimming padding per batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import TensorDataset


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each (len(texts), max_length): every text as ``<|endoftext|> text
    <|endoftext|>``, truncated to ``max_length`` tokens and right-padded with the pad id (mask 0)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids = torch.full((len(texts), max_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), max_length), dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = list(tokenizer.encode(text, add_eos=True))[:max_length]
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, : len(tokens)] = 1
    return ids, mask


def lm_dataset(tokenizer: Any, texts: Sequence[str], max_length: int) -> TensorDataset:
    """A ``TensorDataset(input_ids, attention_mask)`` of ``texts`` (see :func:`encode_texts`)."""
    return TensorDataset(*encode_texts(tokenizer, texts, max_length))


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns that are padding for every example of the batch (saves compute; exact for
    right-padded batches, since no real token attends to later positions)."""
    if input_ids.shape[0] == 0:
        return input_ids[:, :1], attention_mask[:, :1]
    length = int(attention_mask.sum(1).max())
    length = max(length, 1)
    return input_ids[:, :length], attention_mask[:, :length]
