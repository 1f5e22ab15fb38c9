"""Language models with dptrain: Hugging Face causal LMs, LoRA, user-level privacy and a memorisation test.

- ``loss``: :func:`causal_lm_loss`, the per-example mean token loss DP-SGD needs (not a batch-wide token mean).
- ``models``: :func:`tiny_gpt2` / :func:`build_causal_lm` from configs, :func:`load_causal_lm` from a local
  directory (never downloads), :func:`add_lora` (peft LoRA adapters; only they are trained and privatised).
- ``tokenizer``: :class:`SimpleTokenizer`, an offline word-level tokenizer for synthetic text.
- ``data``: padded ``(input_ids, attention_mask)`` datasets.
- ``generation``: :func:`generate` (greedy or sampled) and sequence scoring for canary exposure.
- ``corpus``: the seeded synthetic customer-support chat corpus with planted secrets.
- ``training``, ``evaluation``, ``memorization``: the ``dptrain experiment memorization`` experiment and its parts.

Needs ``transformers`` (and ``peft`` for LoRA).
"""

from dptrain.lm.corpus import Canary, Conversation, SupportChatCorpus, public_support_chats, support_chat_corpus
from dptrain.lm.data import encode_texts, lm_dataset, trim_padding
from dptrain.lm.evaluation import (
    PrivatePerplexity,
    canary_report,
    private_validation_perplexity,
    validation_perplexity,
)
from dptrain.lm.generation import continuation_log_likelihoods, generate, log_likelihood_fn
from dptrain.lm.loss import causal_lm_loss, token_log_likelihoods
from dptrain.lm.memorization import QUICK, MemorizationConfig, run_memorization_experiment
from dptrain.lm.models import (
    add_lora,
    build_causal_lm,
    count_parameters,
    load_causal_lm,
    tiny_gpt2,
    trainable_parameters,
)
from dptrain.lm.tokenizer import SimpleTokenizer
from dptrain.lm.training import PrivacySettings, TrainingResult, train_causal_lm

__all__ = [
    "QUICK",
    "Canary",
    "Conversation",
    "MemorizationConfig",
    "PrivacySettings",
    "PrivatePerplexity",
    "SimpleTokenizer",
    "SupportChatCorpus",
    "TrainingResult",
    "add_lora",
    "build_causal_lm",
    "canary_report",
    "causal_lm_loss",
    "continuation_log_likelihoods",
    "count_parameters",
    "encode_texts",
    "generate",
    "lm_dataset",
    "load_causal_lm",
    "log_likelihood_fn",
    "private_validation_perplexity",
    "public_support_chats",
    "run_memorization_experiment",
    "support_chat_corpus",
    "tiny_gpt2",
    "token_log_likelihoods",
    "train_causal_lm",
    "trainable_parameters",
    "trim_padding",
    "validation_perplexity",
]
