"""Suite-wide settings: one intra-op thread, since the tests' tensors are tiny and thread start-up dominates."""

import torch

torch.set_num_threads(1)
