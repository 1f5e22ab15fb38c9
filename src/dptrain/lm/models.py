"""Hugging Face causal language models built offline, and LoRA adapters through ``peft``.

Everything here works without network access: models are built from a config (random weights) or loaded from a
local directory with ``local_files_only=True``; nothing is ever downloaded from a hub.

Which models train with dptrain's fast engine: any model whose trainable parameters sit in layers with a rule
(nn.Linear, GPT-2's Conv1D, nn.Embedding, LayerNorm/RMSNorm/GroupNorm, nn.Conv1d/2d); other trainable layers fall
back to exact torch.func per-example gradients for that layer only. GPT-2 is covered entirely by rules: the token
embedding ``wte`` and the output head ``lm_head`` share one weight (tied), whose per-example gradient the engine
materialises and sums over both uses; the position embedding sees position ids shared by the batch, which the
engine expands per example.

LoRA (``add_lora``): peft replaces each targeted layer by a wrapper computing ``base(x) + B(A(dropout(x))) *
alpha / r`` where A and B are ordinary ``nn.Linear`` modules (also for GPT-2's Conv1D targets) and the base layer
is frozen. The engine only hooks layers with trainable parameters, so it touches only the adapters (the Linear
rule) and never the frozen base; the DP optimizer privatises exactly the parameters the optimizer updates.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: LoRA targets of GPT-2: attention in/out projections and both MLP projections (all Conv1D).
GPT2_LORA_TARGETS = ("c_attn", "c_proj", "c_fc")


def tiny_gpt2(
    vocab_size: int,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 128,
    dropout: float = 0.0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    tie_word_embeddings: bool = True,
    seed: int | None = None,
):
    """A small ``GPT2LMHeadModel`` from a config (random weights; tied input/output embeddings by default).

    ``dropout`` sets the residual, embedding and attention dropout (0 by default: deterministic training).
    ``seed`` seeds the weight initialisation without touching torch's global generator.
    """
    from transformers import GPT2Config  # optional: the [lm] extra

    config = GPT2Config(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    return build_causal_lm(config, seed=seed)


def build_causal_lm(config: Any, *, seed: int | None = None):
    """A causal LM with random weights from a ``transformers`` config (``AutoModelForCausalLM.from_config``)."""
    from transformers import AutoModelForCausalLM  # optional: the [lm] extra

    if seed is None:
        return AutoModelForCausalLM.from_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def load_causal_lm(path: str | os.PathLike[str], **kwargs: Any):
    """Load a causal LM saved with ``save_pretrained`` from the local directory ``path`` (never downloads).

    Extra keyword arguments go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``).
    """
    from transformers import AutoModelForCausalLM  # optional: the [lm] extra

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no model directory at {directory}: load_causal_lm only reads local directories written by "
            "save_pretrained (it never downloads from a hub)"
        )
    return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **kwargs)


def _is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}" == "transformers.pytorch_utils.Conv1D"


def default_lora_targets(model: nn.Module) -> list[str] | str:
    """GPT-2's Conv1D projections when the model has them, otherwise peft's "all-linear"."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_conv1d(m)}
    targets = [t for t in GPT2_LORA_TARGETS if t in names]
    return targets or "all-linear"


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] | str | None = None,
    dropout: float = 0.0,
    init_lora_weights: bool | str = True,
    **lora_kwargs: Any,
):
    """Add LoRA adapters with ``peft`` and freeze everything else; returns peft's ``PeftModel``.

    ``target_modules``: module names (suffixes) to adapt; default: GPT-2's ``c_attn``, ``c_proj``, ``c_fc`` (or
    "all-linear" for other models). For GPT-2's Conv1D targets, peft's ``fan_in_fan_out`` is set automatically.
    ``init_lora_weights=True`` starts B at zero (the adapted model equals the base model); ``False`` initialises
    both A and B randomly (used by tests so that every adapter parameter gets a gradient). Further arguments go to
    ``peft.LoraConfig``. The returned model trains with ``PrivacyEngine`` as is: give the optimizer
    ``[p for p in model.parameters() if p.requires_grad]`` (the adapters) and make it private.
    """
    try:
        from peft import LoraConfig, get_peft_model  # optional: the [lm] extra
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("add_lora needs the 'peft' package: pip install 'peft>=0.13,<1'") from err
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    targets = default_lora_targets(model) if target_modules is None else target_modules
    targets = targets if isinstance(targets, str) else list(targets)
    named = dict(model.named_modules())
    conv1d_targets = any(
        _is_conv1d(m)
        for name, m in named.items()
        if not isinstance(targets, str) and name.rsplit(".", 1)[-1] in targets
    )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=dropout,
        fan_in_fan_out=conv1d_targets,
        init_lora_weights=init_lora_weights,
        bias="none",
        **lora_kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require gradients (the adapters of a LoRA model): what to give the optimizer."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
