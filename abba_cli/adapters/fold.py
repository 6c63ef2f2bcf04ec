"""Where an adapter is folded into its base weights (W0 + dW): the process's own GPU when there is one.

`abba merge` and `abba eval` both fold here; on a GPU a 7B fold takes seconds instead of minutes of fp32 CPU
matmuls. Under a launcher (torchrun, accelerate launch) each process folds on its own device, cuda:LOCAL_RANK.
"""

from __future__ import annotations

import os

import torch


def local_rank() -> int:
    """This process's index on its machine (torchrun and accelerate launch set LOCAL_RANK; alone: 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def fold_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")
