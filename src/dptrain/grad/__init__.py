"""Per-example gradient engines: ``auto`` (fast, single backward) and ``vmap`` (the torch.func reference)."""

from torch import nn

from dptrain.grad.base import GradSampler, MaterializedGradients, PerExampleGradients
from dptrain.grad.fast import FastGradSampler
from dptrain.grad.vmap import VmapGradSampler

GRAD_SAMPLE_MODES = ("auto", "vmap")
#: Opacus' grad_sample_mode names on dptrain's two engines: its hooks, expanded weights and ghost clipping all give
#: per-layer exact per-example norms, which "auto" computes (ghost norms where cheaper, one backward pass);
#: functorch is torch.func, dptrain's "vmap".
OPACUS_MODES = {"hooks": "auto", "ew": "auto", "ghost": "auto", "functorch": "vmap"}


def make_grad_sampler(mode: str, module: nn.Module, batch_first: bool, loss_reduction: str) -> GradSampler:
    """The per-example gradient engine for ``mode`` (or an Opacus name for it), attached to ``module``."""
    mode = OPACUS_MODES.get(mode, mode)
    if mode == "auto":
        # Under DDP too: the engine turns DDP's gradient averaging off, so .grad is this rank's own batch gradient.
        return FastGradSampler(module, batch_first=batch_first, loss_reduction=loss_reduction, check_attribution=True)
    if mode == "vmap":
        return VmapGradSampler(module, batch_first=batch_first, loss_reduction=loss_reduction)
    raise ValueError(
        f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES} (or Opacus' {tuple(OPACUS_MODES)}), got {mode!r}"
    )


__all__ = [
    "GRAD_SAMPLE_MODES",
    "OPACUS_MODES",
    "FastGradSampler",
    "GradSampler",
    "MaterializedGradients",
    "PerExampleGradients",
    "VmapGradSampler",
    "make_grad_sampler",
]
