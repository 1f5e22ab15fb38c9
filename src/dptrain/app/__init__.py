"""The product layer: config-driven training runs (``dptrain train``) and the demo, on top of the library.

Imports go one way: ``dptrain.cli`` -> ``dptrain.app`` -> {``report``, ``audit``, ``lm``} -> the core (engine,
optim, grad, sampling, accounting, budget, rundir, datasets). Modules: ``config`` (the run's settings and their
TOML parser), ``data`` (digits or a CSV with declared ranges), ``models`` (the MLP), ``stopping`` (progress display
protocol, Ctrl-C), ``train`` (a run from config to run directory), ``demo`` (the digits recipe and the demo suite).
"""

from dptrain.app.config import (
    AuditConfig,
    CardConfig,
    ConfigError,
    DatasetConfig,
    LedgerConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    TrainingConfig,
    load_config,
    parse_config,
    parse_override,
)
from dptrain.app.data import LoadedData, load_dataset
from dptrain.app.models import build_model, describe_model, evaluate
from dptrain.app.stopping import BUDGET_EXHAUSTED, COMPLETED, INTERRUPTED, RunDisplay, StopRequest, stop_on_signals
from dptrain.app.train import RunResult, run_training, write_suite

__all__ = [
    "AuditConfig", "BUDGET_EXHAUSTED", "CardConfig", "COMPLETED", "ConfigError", "DatasetConfig", "INTERRUPTED", "LedgerConfig",
    "LoadedData", "ModelConfig", "PrivacyConfig", "RunConfig", "RunDisplay", "RunResult", "StopRequest",
    "TrainingConfig", "build_model", "describe_model", "evaluate", "load_config", "load_dataset", "parse_config",
    "parse_override", "run_training", "stop_on_signals", "write_suite",
]
