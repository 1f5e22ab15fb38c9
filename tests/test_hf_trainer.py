"""Issue #10, item 4: the Hugging Face Trainer with DP (``dptrain.hf.DPTrainer``), on a tiny GPT-2 built from a
config, LoRA through peft, and the support-chat corpus with user-level privacy by a column of the dataset.

Checked: the run is DP-SGD through the engine (Poisson sampling of users, epsilon within the target, reported in
the Trainer's logs), the noiseless training statistics are kept out of its logs and result, the Trainer's own
clipping and accumulation are refused, the per-example loss is used (padded chats: the model's labels= loss would
be refused by the engine's first-step check), a planned run that does not fit the budget is refused and a
fixed-noise run stops at the step the budget allows, and ``save_model`` writes adapters that plain peft loads into
the same weights.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from transformers import TrainingArguments

from dptrain.budget import BudgetLedger
from dptrain.hf import DPTrainer
from dptrain.lm import SimpleTokenizer, add_lora, lm_dataset, support_chat_corpus, tiny_gpt2
from dptrain.lm.corpus import vocabulary_text

DELTA = 1e-5


class Chats(Dataset):
    """Dict items as a Trainer dataset has them: input_ids, attention_mask and the user's id."""

    def __init__(self, pairs, users) -> None:
        self.pairs, self.users = pairs, list(users)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        ids, mask = self.pairs[i]
        return {"input_ids": ids, "attention_mask": mask, "user_id": self.users[i]}


def _setup(users: int = 24, lora: bool = True):
    torch.manual_seed(0)
    tokenizer = SimpleTokenizer.from_texts([vocabulary_text()])
    model = tiny_gpt2(tokenizer.vocab_size, n_layer=1, n_embd=16, n_head=2, n_positions=48,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = add_lora(model, r=4, alpha=8) if lora else model
    corpus = support_chat_corpus(num_users=users, validation_users=0, seed=0)
    pairs = lm_dataset(tokenizer, corpus.texts("train"), max_length=48)
    return model, Chats(pairs, corpus.user_ids("train"))


def _args(tmp_path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, num_train_epochs=2,
                   learning_rate=3e-3, max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no",
                   use_cpu=True, disable_tqdm=True)  # fmt: skip
    return TrainingArguments(**{**options, **overrides})


def test_dp_trainer_trains_a_lora_gpt2_per_user_and_logs_epsilon_only(tmp_path):
    model, data = _setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=data, target_epsilon=4.0, delta=DELTA,
                        user_column="user_id")  # fmt: skip
    result = trainer.train()
    assert 0 < trainer.epsilon <= 4.0 and trainer.engine.privacy_unit == "user"
    assert trainer.engine.accountant.steps == trainer.state.global_step == 2 * 4  # 24 users, 6 expected: 4 per epoch
    logged = [entry for entry in trainer.state.log_history if "epsilon" in entry]
    assert logged and all(entry["epsilon"] <= 4.0 for entry in logged)
    assert not any(key in entry for entry in trainer.state.log_history for key in ("loss", "grad_norm", "train_loss"))
    assert result.training_loss != result.training_loss  # NaN: not released
    assert result.metrics["epsilon"] == pytest.approx(trainer.epsilon)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert moved and all("lora" in n for n in moved)


def test_the_saved_adapters_load_in_plain_peft(tmp_path):
    from peft import PeftModel

    model, data = _setup()
    trainer = DPTrainer(model=model, args=_args(tmp_path, num_train_epochs=1), train_dataset=data,
                        target_epsilon=8.0, delta=DELTA, user_column="user_id")  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    torch.manual_seed(0)
    base, _ = _setup(lora=False)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "saved"))
    trained = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        if "lora" in name:
            assert torch.equal(p.detach(), trained[name].detach()), name


def test_the_budget_ledger_stops_training_at_the_step_it_allows(tmp_path):
    ledger = BudgetLedger(tmp_path / "privacy.db")
    ledger.create("chats", epsilon=2.0, delta=DELTA, privacy_unit="user")
    model, data = _setup()
    first = DPTrainer(model=model, args=_args(tmp_path, num_train_epochs=1), train_dataset=data, target_epsilon=1.5,
                      delta=DELTA, user_column="user_id", ledger=ledger, budget="chats")  # fmt: skip
    first.train()
    model, data = _setup()
    too_much = DPTrainer(model=model, args=_args(tmp_path), train_dataset=data, target_epsilon=1.5, delta=DELTA,
                         user_column="user_id", ledger=ledger, budget="chats")  # fmt: skip
    with pytest.raises(Exception, match="would be exceeded"):  # a planned run that does not fit: refused whole
        too_much.train()
    model, data = _setup()
    second = DPTrainer(model=model, args=_args(tmp_path, num_train_epochs=20), train_dataset=data,
                       noise_multiplier=4.0, delta=DELTA, user_column="user_id", ledger=ledger, budget="chats")  # fmt: skip
    second.train()
    allowed = second.optimizer.optimizer.step_allowance  # the Trainer's AcceleratedOptimizer around the engine's
    assert second.budget_exhausted and 0 < second.state.global_step == allowed < 20 * 4
    assert ledger.spent("chats") <= 2.0 + 1e-9


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_grad_norm=1.0), "set it to 0"),
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps must be 1"),
        (dict(num_train_epochs=1.5), "whole number of epochs"),
    ],
)
def test_trainer_settings_that_would_void_or_misstate_the_guarantee_are_refused(tmp_path, overrides, message):
    model, data = _setup()
    with pytest.raises(ValueError, match=message):
        DPTrainer(model=model, args=_args(tmp_path, **overrides), train_dataset=data, target_epsilon=4.0, delta=DELTA)
