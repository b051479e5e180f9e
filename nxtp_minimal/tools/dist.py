"""One process per device under `torchrun` (train, predict): the process group from torchrun's environment."""

import os

import torch
import torch.distributed as dist

from .errors import UserError


def world_size() -> int:
    """How many processes torchrun started (1 without torchrun); readable before the group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed(device: str):
    """(rank, world size, device) from torchrun's environment; a single process without it.

    gloo on CPU, nccl on GPU, where each process takes the GPU of its LOCAL_RANK.
    """
    if world_size() == 1:
        return 0, 1, device
    if not dist.is_available():
        raise UserError("this PyTorch was built without torch.distributed: run one process, without torchrun")
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device
