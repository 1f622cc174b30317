"""Which device a role computes on. Ray assigns GPUs by setting CUDA_VISIBLE_DEVICES for the
actor, so the first visible device is the one reserved for it."""
from __future__ import annotations

import torch


def role_device(role: str, num_gpus: float, setting: str) -> torch.device:
    """``cuda:0`` (the GPU Ray reserved for this actor) when ``num_gpus`` > 0, else the CPU.

    Raises:
        RuntimeError: a GPU was asked for (``setting``: the config key and value) but this process has no CUDA; Ray's
            logical GPUs can be declared on a machine without one.
    """
    if num_gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{role}: {setting} but CUDA is not available in this process "
                           "(torch.cuda.is_available() is False); set it to 0 (false) to run this role on CPU")
    return torch.device("cuda", 0)
