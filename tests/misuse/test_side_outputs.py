"""Issue #14 item 3 (the LM training path): a number about the training data that is not a DP release (the mean
training loss, computed without noise) is not logged or returned under DP unless asked for, and then says it is
outside the guarantee. Without DP nothing is protected and it is reported as before."""

from __future__ import annotations

from test_lm_gradients import lora_gpt2, padded_batch  # tests/ is on the path (tests/misuse/conftest.py)
from torch.utils.data import TensorDataset

from dptrain.lm import PrivacySettings, train_causal_lm


def _train(**kwargs):
    ids, mask = padded_batch([3 + i % 6 for i in range(16)], seed=2)
    lines: list[str] = []
    result = train_causal_lm(lora_gpt2(seed=1), TensorDataset(ids, mask), epochs=2, lr=1e-3, log=lines.append, **kwargs)
    return result, lines


PRIVATE = PrivacySettings(target_epsilon=4.0, delta=1e-3, expected_units=8, privacy_unit="example")


def test_private_training_neither_logs_nor_returns_the_training_loss_by_default():
    result, lines = _train(privacy=PRIVATE)
    assert result.losses == []
    assert lines and not any("loss" in line for line in lines), lines


def test_asked_for_under_dp_the_training_loss_is_marked_outside_the_guarantee():
    result, lines = _train(privacy=PRIVATE, training_loss=True)
    assert len(result.losses) == 2
    loss_lines = [line for line in lines if "training loss" in line]
    assert len(loss_lines) == 2 and all("outside the DP guarantee" in line for line in loss_lines)


def test_non_private_training_reports_its_loss():
    result, lines = _train()
    assert len(result.losses) == 2 and sum("training loss" in line for line in lines) == 2
    assert not any("outside" in line for line in lines)
