"""A small layer over torch.distributed: DDP when launched by torchrun, a world of one otherwise.

Backend follows the device (nccl on CUDA, gloo on CPU). Only rank 0 writes files.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, List

import torch
import torch.distributed as td
from torch import nn


def is_launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return td.is_available() and td.is_initialized()


def init_from_env(device: torch.device, timeout_s: float = 1800.0) -> None:
    """Initialise the process group when torchrun (or SLURM via torchrun) set RANK/WORLD_SIZE. ``timeout_s`` bounds
    how long the other ranks wait when one rank stops (``train.ddp_timeout_s``)."""
    if not is_launched() or is_initialized():
        return
    from datetime import timedelta

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    td.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    if is_initialized():
        td.destroy_process_group()


def rank() -> int:
    return td.get_rank() if is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        td.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        t = t.clone()
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / world_size()


def all_gather_object(obj: Any) -> List[Any]:
    if not is_initialized():
        return [obj]
    out: List[Any] = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. to build a cache), the others wait, then run it too."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False, sync_batchnorm: bool = False) -> nn.Module:
    """DDP when several processes run; ``sync_batchnorm`` converts BatchNorm layers to SyncBatchNorm in place
    (batch statistics over the global batch, so N processes match one process with an N-times batch)."""
    if world_size() == 1:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module  # frozen modules (teachers, sources) are never wrapped
    if sync_batchnorm:
        for name, child in list(module.named_children()):
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
