"""Per-layer rules of the fast engine (``rules``: the interface, the rounding-bound checks, the registry) and the
rules for each layer type, registered on import: ``linear`` (nn.Linear, GPT-2's Conv1D), ``conv``, ``embedding``,
``norm`` (LayerNorm, GroupNorm, RMSNorm), ``attention`` (nn.MultiheadAttention's projections)."""

from dptrain.grad.layers import attention, conv, embedding, linear, norm  # noqa: F401  (registration)
from dptrain.grad.layers.rules import (
    MATERIALISED,
    NORM_RTOL,
    ExactPart,
    LayerCall,
    LayerRule,
    absolute_bound,
    add_exact,
    dense_exact,
    fast_weights,
    recheck_uncertain,
    register_rule,
    register_rule_by_name,
    rule_for,
    shared_squared_norms,
    trainable,
    uncertain,
)

__all__ = [
    "MATERIALISED", "NORM_RTOL", "ExactPart", "LayerCall", "LayerRule", "absolute_bound", "add_exact", "dense_exact",
    "fast_weights", "recheck_uncertain", "register_rule", "register_rule_by_name", "rule_for",
    "shared_squared_norms", "trainable", "uncertain",
]
