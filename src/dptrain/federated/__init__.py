"""Federated learning with differential privacy on Flower (``pip install 'dptrain[fl]'``).

Client-level DP-FedAvg (:class:`DPFedAvg`: the privacy unit is the client, accounted over rounds and charged to a
client-level budget), sample-level DP-SGD inside each client (:func:`dptrain_client_app` with
:class:`SampleLevelDP`), partitions of real data (:func:`dirichlet_partition`, :func:`digits_clients`; one client per user:
:func:`partition_by_user`, :func:`support_chat_clients`), and an audit with canary clients (:class:`ClientCanaries`).
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("dptrain.federated runs on Flower, which is not installed: pip install 'dptrain[fl]'") from e

from dptrain.federated.client import (
    SampleLevelDP,
    client_clipping_mod,
    dptrain_client_app,
    partition_id,
    register_partition_query,
)
from dptrain.federated.canaries import ClientCanaries
from dptrain.federated.mechanism import ClientLevelGaussian, ClientSampler, MalformedUpdate, clip_update
from dptrain.federated.partition import digits_clients, dirichlet_partition, partition_by_user, support_chat_clients
from dptrain.federated.report import federated_run_record, write_federated_run
from dptrain.federated.strategy import DPFedAvg, SampledFedAvg

__all__ = [
    "ClientCanaries",
    "ClientLevelGaussian",
    "ClientSampler",
    "DPFedAvg",
    "MalformedUpdate",
    "SampleLevelDP",
    "SampledFedAvg",
    "client_clipping_mod",
    "clip_update",
    "digits_clients",
    "dirichlet_partition",
    "dptrain_client_app",
    "federated_run_record",
    "partition_by_user",
    "partition_id",
    "register_partition_query",
    "support_chat_clients",
    "write_federated_run",
]
