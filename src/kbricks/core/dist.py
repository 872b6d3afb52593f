"""A small layer over torch.distributed: DDP when launched by torchrun, a world of one otherwise.

Backend follows the device (nccl on CUDA, gloo on CPU). Only rank 0 writes files.
"""

from __future__ import annotations

import os
from typing import Any, List

import torch
import torch.distributed as td
from torch import nn

from .io import first_line


def is_launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return td.is_available() and td.is_initialized()


def init_from_env(device: torch.device, timeout_s: float = 1800.0) -> None:
    """Initialise the process group when torchrun (or SLURM via torchrun) set RANK/WORLD_SIZE. ``timeout_s`` bounds
    how long the other ranks wait when one rank stops (``train.ddp_timeout_s``). A launch that cannot form the
    group (no MASTER_ADDR, a rank that never arrives) fails with one line."""
    if not is_launched() or is_initialized():
        return
    from datetime import timedelta

    from ..errors import ConfigError

    where = f"RANK={os.environ['RANK']} WORLD_SIZE={os.environ['WORLD_SIZE']}"
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"{where} is set but {' and '.join(missing)} is not: launch DDP runs with "
                          "torchrun --nproc_per_node=N (or unset RANK and WORLD_SIZE for one process)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        td.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"could not start DDP ({where}, {backend}): {_first_line(exc)}; launch with torchrun "
                          f"--nproc_per_node=N, and check that every rank started (waited train.ddp_timeout_s={timeout_s:g}s)") from None


def _first_line(exc: BaseException) -> str:
    """The first sentence of a torch.distributed error (their messages run on with advice for torch developers)."""
    return first_line(exc, 200).split(". ", 1)[0].rstrip(".")


_PEER_FAILURE = ("connection reset", "connection closed", "connection refused", "broken pipe", "timed out", "gloo", "nccl")


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another rank stopped (killed, crashed, hung past the timeout)."""
    if not is_initialized():
        return False
    dist_error = getattr(td, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return any(k in text for k in _PEER_FAILURE)


def peer_failure_error(exc: BaseException, timeout_s: float) -> Exception:
    from ..errors import KbricksError

    return KbricksError(f"rank {rank()} of {world_size()}: another DDP process stopped or stopped answering "
                        f"({_first_line(exc)}); the others wait at most train.ddp_timeout_s={timeout_s:g}s. "
                        "Restart every rank with --resume to continue from the last checkpoint")


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


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False, sync_batchnorm: bool = False) -> nn.Module:
    """DDP when several processes run; ``sync_batchnorm`` converts BatchNorm layers to SyncBatchNorm in place
    (batch statistics over the global batch, so N processes match one process with an N-times batch). On CPU,
    where torch's SyncBatchNorm does not run, they become :class:`CpuSyncBatchNorm`."""
    if world_size() == 1:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module  # frozen modules (teachers, sources) are never wrapped
    if sync_batchnorm and device.type == "cuda":
        for name, child in list(module.named_children()):
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    elif sync_batchnorm:  # torch's SyncBatchNorm refuses CPU modules: same layers, synchronised by our function
        for m in module.modules():
            if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):  # not subclasses with their own forward
                m.__class__ = CpuSyncBatchNorm
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation with the statistics of the global batch, for any device and backend (gloo on CPU).

    Forward: all-reduce of the per-channel sums and counts, then of the centred sums of squares (two passes, like
    a single process). Backward: all-reduce of sum(dy) and sum(dy * x_hat), so every rank's input gradient
    includes what its samples did to the other ranks' losses through the shared statistics. The weight and bias
    gradients stay local: DDP averages them like every other parameter."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        first = torch.cat([xf.sum(dims), xf.new_tensor([x.numel() // c])])
        td.all_reduce(first, group=group)
        count = first[c]
        mean = first[:c] / count
        centred = xf - mean.view(shape)
        var_sum = (centred * centred).sum(dims)
        td.all_reduce(var_sum, group=group)
        var = var_sum / count
        invstd = torch.rsqrt(var + eps)
        x_hat = centred * invstd.view(shape)
        y = x_hat
        if weight is not None:
            y = y * weight.view(shape).float() + bias.view(shape).float()
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * count / (count - 1).clamp_min(1)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.group, ctx.count = group, count
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, invstd, weight = ctx.saved_tensors
        c = x_hat.shape[1]
        dims = [0] + list(range(2, x_hat.dim()))
        shape = [1, c] + [1] * (x_hat.dim() - 2)
        g = grad_out.float()
        sum_g, sum_g_xhat = g.sum(dims), (g * x_hat).sum(dims)
        grad_weight = sum_g_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_g.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_g, sum_g_xhat])
            td.all_reduce(both, group=ctx.group)
            mean_g, mean_g_xhat = both[:c] / ctx.count, both[c:] / ctx.count
            scale = invstd if weight is None else invstd * weight.float()
            grad_x = ((g - mean_g.view(shape) - x_hat * mean_g_xhat.view(shape)) * scale.view(shape)).to(grad_out.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer (1d/2d/3d, converted in place: same parameters and buffers, so checkpoints are unchanged)
    that, in training under DDP on CPU (gloo), normalises with the global batch statistics through
    :class:`_SyncBatchNormFunction`; in evaluation it is plain BatchNorm with the (identical) running statistics."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_initialized() and world_size() > 1 and x.device.type == "cpu"):
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        running_mean = running_var = None
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
            running_mean, running_var = self.running_mean, self.running_var
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, running_mean, running_var, self.eps, momentum, td.group.WORLD)

