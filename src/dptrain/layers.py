"""Opacus' DP layer names, for code written against ``opacus.layers``: the torch layers themselves.

Opacus reimplements recurrent layers and multi-head attention so that its hooks can see their parameters. dptrain
needs no replacement: ``nn.MultiheadAttention`` runs as its projections on the fast path, and ``nn.LSTM``, ``nn.GRU``
and ``nn.RNN`` get exact per-example gradients from the torch.func fallback. So these names are the torch classes
(same arguments, same state_dict keys as torch, which differ from Opacus' own DPLSTM keys).
"""

from torch import nn

DPLSTM = nn.LSTM
DPGRU = nn.GRU
DPRNN = nn.RNN
DPMultiheadAttention = nn.MultiheadAttention

__all__ = ["DPGRU", "DPLSTM", "DPMultiheadAttention", "DPRNN"]
