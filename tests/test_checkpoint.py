"""Issue #2: checkpointing. engine.state_dict()/load_state_dict() carry the accountant's history, so that
save -> new process -> load -> continue reports the same epsilon as an uninterrupted run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dptrain import PrivacyEngine

DELTA = 1e-5
K_STEPS, M_STEPS = 8, 6  # 4 steps per epoch: the checkpoint falls on an epoch boundary

# Shared by the test process and the resumed process: the same model, data, optimizer and engine settings.
SETUP = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from dptrain import PrivacyEngine

    def build(accountant):
        torch.manual_seed(0)
        x = torch.randn(80, 6)
        data = TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        engine = PrivacyEngine(accountant=accountant)
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=20),
            noise_multiplier=1.1, max_grad_norm=1.0, noise_generator=torch.Generator().manual_seed(42),
        )
        return engine, model, optimizer, loader

    def train(model, optimizer, loader, steps):
        loss_fn = nn.CrossEntropyLoss()
        done = 0
        while done < steps:
            for x, y in loader:
                if done == steps:
                    break
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
                done += 1
    """
)

RESUME = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from ckpt_setup import build, train

    path, accountant, steps, delta = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    engine, model, optimizer, loader = build(accountant)
    state = torch.load(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    engine.load_state_dict(state["engine"])
    eps_loaded = engine.get_epsilon(delta)
    train(model, optimizer, loader, steps)
    torch.save({k: v for k, v in model.state_dict().items()}, path + ".final")
    print(json.dumps({"eps_loaded": eps_loaded, "eps": engine.get_epsilon(delta), "steps": optimizer.steps_taken}))
    """
)


def _setup_module(tmp_path: Path):
    """Write the setup and resume scripts to ``tmp_path`` and import the setup here (not via sys.modules)."""
    (tmp_path / "ckpt_setup.py").write_text(SETUP)
    (tmp_path / "resume.py").write_text(RESUME)
    spec = importlib.util.spec_from_file_location(f"ckpt_setup_{tmp_path.name}", tmp_path / "ckpt_setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resume_in_new_process_gives_same_epsilon(tmp_path: Path) -> None:
    accountant = "pld"  # the default; the RDP variant below resumes in-process (a new process costs ~4 s of imports)
    setup = _setup_module(tmp_path)

    # Uninterrupted run of K + M steps.
    engine, model, optimizer, loader = setup.build(accountant)
    setup.train(model, optimizer, loader, K_STEPS + M_STEPS)
    eps_full = engine.get_epsilon(DELTA)
    full_params = {k: v.clone() for k, v in model.state_dict().items()}
    assert optimizer.steps_taken == K_STEPS + M_STEPS

    # Interrupted run: K steps, save everything.
    engine, model, optimizer, loader = setup.build(accountant)
    setup.train(model, optimizer, loader, K_STEPS)
    eps_k = engine.get_epsilon(DELTA)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"engine": engine.state_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict()}, path
    )
    del engine, model, optimizer, loader

    proc = subprocess.run(
        [sys.executable, str(tmp_path / "resume.py"), str(tmp_path), str(path), accountant, str(M_STEPS), str(DELTA)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert result["eps_loaded"] == pytest.approx(eps_k, rel=1e-9)
    assert result["eps"] == pytest.approx(eps_full, rel=1e-9)
    assert result["eps"] > eps_k > 0
    assert result["steps"] == K_STEPS + M_STEPS
    # The checkpoint also carries the noise/sampling generator: the resumed run draws the same batches and noise.
    # Not bit-exact (CPU BLAS results may differ in the last bits between processes), but a different batch or
    # noise draw would move parameters by ~lr = 0.05, far outside this tolerance.
    resumed = torch.load(str(path) + ".final")
    for k, v in full_params.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-4, atol=1e-5)


def test_resume_rdp_from_file_gives_same_epsilon(tmp_path: Path) -> None:
    setup = _setup_module(tmp_path)
    engine, model, optimizer, loader = setup.build("rdp")
    setup.train(model, optimizer, loader, K_STEPS + M_STEPS)
    eps_full = engine.get_epsilon(DELTA)

    engine, model, optimizer, loader = setup.build("rdp")
    setup.train(model, optimizer, loader, K_STEPS)
    path = tmp_path / "ckpt.pt"
    torch.save({"engine": engine.state_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)

    engine, model, optimizer, loader = setup.build("rdp")
    state = torch.load(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    engine.load_state_dict(state["engine"])
    assert optimizer.steps_taken == K_STEPS
    setup.train(model, optimizer, loader, M_STEPS)
    assert engine.accountant.steps == K_STEPS + M_STEPS
    assert engine.get_epsilon(DELTA) == pytest.approx(eps_full, rel=1e-9)


def test_state_dict_roundtrip_in_fresh_engine(tmp_path: Path) -> None:
    setup = _setup_module(tmp_path)
    engine, model, optimizer, loader = setup.build("pld")
    setup.train(model, optimizer, loader, 5)
    path = tmp_path / "engine.pt"
    torch.save(engine.state_dict(), path)

    fresh = PrivacyEngine()
    assert fresh.get_epsilon(DELTA) == 0.0
    fresh.load_state_dict(torch.load(path))
    assert fresh.get_epsilon(DELTA) == pytest.approx(engine.get_epsilon(DELTA), rel=1e-12)
    assert fresh.accountant.steps == 5
    assert fresh.dataset_size == 80


def test_state_dict_carries_accountant_kind() -> None:
    # An RDP history loaded into an engine built with the default accountant still reports the RDP epsilon.
    from dptrain.accounting import compute_epsilon

    rdp = PrivacyEngine(accountant="rdp")
    rdp.accountant.step(0.25, 1.1, count=10)
    other = PrivacyEngine()
    other.load_state_dict(rdp.state_dict())
    assert other.get_epsilon(DELTA) == pytest.approx(compute_epsilon(0.25, 1.1, 10, DELTA, "rdp"), rel=1e-12)


def test_opacus_save_and_load_checkpoint_resume_the_run_exactly(tmp_path: Path) -> None:
    """privacy_engine.save_checkpoint / load_checkpoint as Opacus code calls them: two epochs with a checkpoint
    between them, resumed in fresh objects, end bit-identical to two uninterrupted epochs with the same epsilon."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        data = DataLoader(TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,))), batch_size=10)
        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01), data_loader=data,
            noise_multiplier=1.0, max_grad_norm=1.0, noise_generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        loader.batch_sampler.random.generator.manual_seed(6)
        return model, optimizer, loader, engine

    def epoch(model, optimizer, loader):
        for x, y in loader:
            optimizer.zero_grad()
            if len(y):
                nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    model, optimizer, loader, uninterrupted = fresh()
    epoch(model, optimizer, loader)
    epoch(model, optimizer, loader)
    full = [p.detach().clone() for p in model.parameters()]

    model, optimizer, loader, engine = fresh()
    epoch(model, optimizer, loader)
    engine.save_checkpoint(path=tmp_path / "ckpt.pt", module=model, optimizer=optimizer, checkpoint_dict={"epoch": 1})
    model, optimizer, loader, resumed = fresh()  # a new process would build the same objects
    assert resumed.load_checkpoint(path=tmp_path / "ckpt.pt", module=model, optimizer=optimizer) == {"epoch": 1}
    epoch(model, optimizer, loader)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), full))
    assert resumed.accountant.steps == uninterrupted.accountant.steps == 8
    assert resumed.get_epsilon(1e-5) == uninterrupted.get_epsilon(1e-5)
    with pytest.raises(ValueError, match="noise_scheduler: not supported"):
        resumed.save_checkpoint(path=tmp_path / "x.pt", module=model, noise_scheduler=object())
