"""dptrain: differentially private training for PyTorch."""

from dptrain.accounting import calibrate_noise, compute_epsilon
from dptrain.engine import PrivacyEngine
from dptrain.optim import BudgetExhausted, NonFiniteGradientError
from dptrain.validators import ModuleValidator

__all__ = [
    "BudgetExhausted",
    "ModuleValidator",
    "NonFiniteGradientError",
    "PrivacyEngine",
    "calibrate_noise",
    "compute_epsilon",
]
__version__ = "0.1.0"
