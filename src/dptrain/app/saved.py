"""A model that ``dptrain train`` or the demo wrote, loaded back with the data it was trained and evaluated on.

``load_trained(path)`` takes a run directory, its ``model.pt`` (the release; the run's ``run.json`` beside it says
which data and split it used) or its ``checkpoint.pt``, and rebuilds the model from the architecture recorded in
the run and the dataset from the run's declared configuration (same split seed, same declared scaling), so that an
audit sees exactly the training and held-out examples of the run. Anything else is refused with the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dptrain.app.config import DatasetConfig, ModelConfig
from dptrain.app.data import LoadedData, load_dataset
from dptrain.app.models import build_model
from dptrain.rundir import CHECKPOINT_FILE, MODEL_FILE, MODEL_FORMAT, RUN_FILE, RUN_FORMAT, SUITE_FILE


@dataclass
class TrainedModel:
    """The model (in eval mode), its run's data, the epsilon and delta the run claims (inf and None without DP)."""
    model: Any
    data: LoadedData
    claimed_epsilon: float
    delta: float | None
    run_dir: Path


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _run_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_FILE
    if not path.is_file():
        if (run_dir / SUITE_FILE).is_file():
            runs = json.loads((run_dir / SUITE_FILE).read_text()).get("runs", [])
            raise ValueError(f"{run_dir} is a demo directory of several runs: pass one of them ({', '.join(runs)})")
        raise ValueError(f"{run_dir} holds no {RUN_FILE}: pass a run directory written by dptrain train or the demo")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if run.get("format") != RUN_FORMAT:
        raise ValueError(f"{path} is not a dptrain run record (format {run.get('format')!r})")
    return run


def _weights(path: Path) -> dict[str, Any]:
    """The state dict in ``path``: a ``model.pt`` release or a ``checkpoint.pt``."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding more than tensors and plain data
        raise ValueError(f"{path} is not a model file dptrain wrote ({type(e).__name__}: {e})") from None
    if isinstance(content, dict) and content.get("format") == MODEL_FORMAT:
        return content["state_dict"]
    if isinstance(content, dict) and isinstance(content.get("model"), dict) and "config" in content:
        return content["model"]
    raise ValueError(f"{path} is neither a dptrain {MODEL_FILE} nor a {CHECKPOINT_FILE}")


def load_trained(path: str | Path) -> TrainedModel:
    """The model at ``path`` (a run directory, its model.pt or its checkpoint.pt) with its run's data; raises
    ValueError saying what is wrong otherwise."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    run_dir = path if path.is_dir() else path.parent
    run = _run_record(run_dir)
    weights_file = path if path.is_file() else run_dir / MODEL_FILE
    if not weights_file.is_file():
        raise ValueError(f"{run_dir} has no {MODEL_FILE}: pass the run's {CHECKPOINT_FILE} instead")
    config = run["config"]
    data = load_dataset(DatasetConfig(**_tuples(config["dataset"])))
    model = build_model(data.info["num_features"], data.info["num_classes"], ModelConfig(**_tuples(config["model"])))
    try:
        model.load_state_dict(_weights(weights_file))
    except RuntimeError as e:  # shapes or names differ from the run's recorded architecture
        raise ValueError(f"{weights_file} does not fit the architecture of {run_dir / RUN_FILE}: {e}") from None
    model.eval()
    privacy = run["privacy"]
    dp = privacy.get("differentially_private")
    epsilon = privacy.get("epsilon") if dp else None
    return TrainedModel(model, data, math.inf if epsilon is None else float(epsilon),
                        privacy.get("delta") if dp else None, run_dir)
