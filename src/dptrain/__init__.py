"""dptrain: differentially private training for PyTorch.

Top-level names are imported lazily, so that ``dptrain.budget`` and the command line start without loading torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BudgetExhausted": "dptrain.optim",
    "ModuleValidator": "dptrain.validators",
    "NonFiniteGradientError": "dptrain.optim",
    "PrivacyEngine": "dptrain.engine",
    "calibrate_noise": "dptrain.accounting",
    "compute_epsilon": "dptrain.accounting",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dptrain' has no attribute {name!r}")
