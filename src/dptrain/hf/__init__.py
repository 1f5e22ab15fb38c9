"""The Hugging Face ``Trainer`` with differential privacy: :class:`DPTrainer` (needs ``transformers``; LoRA through
``peft``). Install with ``pip install 'dptrain[lm]'``."""

from dptrain.hf.trainer import DPTrainer

__all__ = ["DPTrainer"]
