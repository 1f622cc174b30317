"""Which device a role computes on, and data parallelism over Ray Train ranks. Ray assigns GPUs by setting CUDA_VISIBLE_DEVICES for the
actor, so the first visible device is the one reserved for it."""
from __future__ import annotations

import torch


def role_device(role: str, num_gpus: float, setting: str, *, rehearse: bool = False) -> torch.device:
    """``cuda:0`` (the GPU Ray reserved for this actor) when ``num_gpus`` > 0, else the CPU.
    In a rehearsal (``cluster.rehearse``) always the CPU: the actor still holds the logical
    GPU Ray gave it, so placement is the real run's, only the arithmetic moves.

    Raises:
        RuntimeError: a GPU was asked for (``setting``: the config key and value) but this process has no CUDA; Ray's
            logical GPUs can be declared on a machine without one.
    """
    if num_gpus <= 0 or rehearse:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{role}: {setting} but CUDA is not available in this process "
                           "(torch.cuda.is_available() is False); set it to 0 (false) to run this role on CPU")
    return torch.device("cuda", 0)


def train_device(role: str, use_gpu: bool, rehearse: bool = False) -> torch.device:
    """The device of a Ray Train worker of ``role`` (learner, sft, rm): Ray Train's GPU for
    this rank, the CPU without ``<role>.use_gpu`` or in a rehearsal, and a clear error where a
    GPU was asked for and CUDA is missing."""
    if role_device(role, float(use_gpu), f"{role}.use_gpu=true", rehearse=rehearse).type == "cpu":
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """DDP over the Ray Train ranks for what trains: the frozen parameters (a 7B base in bf16 is
    13.5 GB, identical on every rank already) are neither broadcast at start-up nor watched,
    and buffers (rotary tables) are not re-broadcast on every forward."""
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    ignore = [n for n, p in module.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, ignore + [n for n, _ in module.named_buffers()])
    return ray.train.torch.prepare_model(module, move_to_device=False,
                                         parallel_strategy_kwargs={"broadcast_buffers": False})


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks of the process group (the values themselves without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
