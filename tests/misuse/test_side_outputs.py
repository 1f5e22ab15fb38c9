"""Issue #14 item 3: a number about the training data that is not a DP release is off by default and marked when
asked for. The LM training path: the mean training loss (computed without noise) is not logged or returned under
DP unless asked for, and then says it is outside the guarantee; without DP nothing is protected and it is reported
as before. ``dptrain train``: the membership audit is off unless configured and marked on the card; the run
directory's release (model.pt) is apart from the files that regenerate the noise."""

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


def _digits_run(tmp_path, secure_mode=False, **overrides):
    """A short DP digits run written to ``tmp_path / "run"`` through ``dptrain train``'s runner."""
    from dptrain.app import DatasetConfig, ModelConfig, PrivacyConfig, RunConfig, TrainingConfig, run_training

    privacy = PrivacyConfig(delta=1e-5, noise_multiplier=2.0, secure_mode=secure_mode)
    config = RunConfig(
        name="side-outputs", dataset=DatasetConfig(), model=ModelConfig(hidden=(8,)),
        training=TrainingConfig(epochs=1, batch_size=700), privacy=privacy, **overrides,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    run_training(config, output_dir=run_dir, handle_signals=False)
    return run_dir


def test_dptrain_train_runs_no_membership_audit_unless_asked_and_marks_it_when_asked(tmp_path):
    """The membership audit compares training losses with held-out ones without noise: off by default; turned on,
    run.json and the card mark it outside the guarantee and the card lists it among the limitations."""
    import json

    from dptrain.app import AuditConfig

    default = _digits_run(tmp_path / "default")
    run, card = (json.loads((default / name).read_text()) for name in ("run.json", "privacy_card.json"))
    assert run["audit"] is None and card["audit"] is None
    assert not any("membership audit" in item for item in card["limitations"])

    audited = _digits_run(tmp_path / "audited", audit=AuditConfig(membership=True))
    run, card = (json.loads((audited / name).read_text()) for name in ("run.json", "privacy_card.json"))
    assert run["audit"]["covered_by_the_guarantee"] is False and card["audit"]["covered_by_the_guarantee"] is False
    assert any("membership audit" in item and "outside the guarantee" in item for item in card["limitations"])
    assert "its figures are outside the guarantee, for reviewers" in (audited / "report.html").read_text()


def test_the_run_directory_separates_the_release_from_the_files_that_regenerate_the_noise(tmp_path):
    """model.pt holds the weights, architecture and declared preprocessing only, loadable with weights_only=True;
    checkpoint.pt (for resuming) holds the noise generator's state, which with the seed regenerates the noise: the
    card of a seeded run says to keep both private and to share model.pt."""
    import json

    import torch

    from dptrain.app import build_model, ModelConfig

    run_dir = _digits_run(tmp_path)
    release = torch.load(run_dir / "model.pt", weights_only=True)
    assert set(release) == {"format", "state_dict", "num_features", "num_classes", "model", "preprocessing"}
    model = build_model(release["num_features"], release["num_classes"], ModelConfig(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in release["model"].items()}))  # fmt: skip
    model.load_state_dict(release["state_dict"])  # the same weights as the checkpoint's
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(v, checkpoint["model"][k]) for k, v in release["state_dict"].items())
    (streams,) = checkpoint["privacy"]["optimizers"][0]["streams"].values()
    assert streams["noise"]["generator"] is not None  # what model.pt must not carry
    card = json.loads((run_dir / "privacy_card.json").read_text())
    assert any("checkpoint.pt" in item and "model.pt" in item for item in card["limitations"])
    assert json.loads((run_dir / "run.json").read_text())["files"]["model"] == "model.pt"


def test_a_secure_run_publishes_a_seed_that_seeds_none_of_its_noise_or_sampling(tmp_path):
    """secure_mode: run.json still records the config's seed (it initialised the model), but no stream of the
    mechanism was seeded: the checkpoint holds no generator state, and the card has no seeded-noise limitation."""
    import json

    import torch

    run_dir = _digits_run(tmp_path, secure_mode=True)
    assert json.loads((run_dir / "run.json").read_text())["config"]["seed"] == 0
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    (streams,) = checkpoint["privacy"]["optimizers"][0]["streams"].values()
    assert streams["noise"]["generator"] is None
    assert streams["sampling"] is None or streams["sampling"].get("generator") is None
    card = json.loads((run_dir / "privacy_card.json").read_text())
    assert card["mechanism"]["secure_randomness"] is True
    assert not any("regenerate the noise" in item for item in card["limitations"])
