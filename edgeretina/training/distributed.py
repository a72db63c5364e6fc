"""Multi-process training: `torchrun --nproc_per_node N -m edgeretina train ...` runs N copies of the
loop that train one model with DistributedDataParallel (DDP).

- `init_from_env` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and joins the process group: "gloo" on
  CPUs, "nccl" when training on CUDA. Without those variables (or WORLD_SIZE=1) it returns a one-process
  context and nothing is initialised, so the loop is the same code either way.
- Every process draws the same batch schedule (the samplers are seeded alike) and takes its disjoint share
  of each batch (`rank_share`): the N shares together are the one-process batch. Each process weighs its
  loss by its share of the batch (`loss_weight`), so DDP's gradient average is the gradient of the mean
  loss over the whole batch even when the batch does not split evenly.
- Only rank 0 logs, validates and writes checkpoints; decisions that end or shorten the run (early
  stopping, the time budget) are made there and broadcast, so every process runs the same epochs.
- Augmentation seeds are offset by rank (the loop's generators), so the shares are augmented independently.
- `shutdown` waits for every process (barrier) and leaves the group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from edgeretina.errors import ConfigError


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None        # None: a single process, no process group
    device: str = "cpu"
    owns_group: bool = False           # this context initialised the group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str = "cpu") -> DistributedContext:
    """The context of this process from torchrun's environment; joins the process group when WORLD_SIZE > 1.

    device: "cpu" or "cuda" (each process then uses cuda:LOCAL_RANK). Raises ConfigError for malformed
    variables or CUDA asked for but missing."""
    world = _env_int("WORLD_SIZE", 1)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for, but torch sees no CUDA device")
    if world <= 1:
        return DistributedContext(device="cuda:0" if device == "cuda" else "cpu")
    rank, local_rank = _env_int("RANK", None), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} outside 0..{world - 1} (WORLD_SIZE={world})")
    backend = "nccl" if device == "cuda" else "gloo"
    where = "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        where = f"cuda:{local_rank}"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend)
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=where,
                              owns_group=owns)


def _env_int(name: str, default: int | None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ConfigError(f"{name} is not set: start multi-process training with torchrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def shutdown(ctx: DistributedContext, failed: bool = False) -> None:
    """Wait for every process and leave the group (when this context joined it). failed: this process
    stops on an error, so it leaves without the barrier (the others may never reach it; torchrun then
    ends them)."""
    if ctx.owns_group and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def rank_share(batch: np.ndarray, ctx: DistributedContext) -> np.ndarray:
    """This process's disjoint share of a batch of indices: every world_size-th one from its rank."""
    return batch[ctx.rank::ctx.world_size] if ctx.is_distributed else batch


def loss_weight(share: int, batch: int, ctx: DistributedContext) -> float:
    """The factor on this process's mean loss that makes DDP's average of gradients the gradient of the
    mean over the whole batch: share * world_size / batch (1 for one process or even shares)."""
    return share * ctx.world_size / batch if ctx.is_distributed else 1.0


def unused_parameters(module: nn.Module, *inputs: torch.Tensor) -> list[str]:
    """Names of trainable parameters that get no gradient from one forward + backward of `inputs`
    (in eval mode, so no BatchNorm statistics move; gradients are cleared afterwards). DDP needs
    find_unused_parameters=True exactly when this is not empty."""
    was_training = module.training
    module.eval()
    try:
        outputs = module(*inputs)
        tensors = [v for v in (outputs.values() if isinstance(outputs, dict) else outputs) if v.requires_grad]
        sum(t.float().sum() for t in tensors).backward()
        unused = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        module.zero_grad(set_to_none=True)
        module.train(was_training)
    return unused


def wrap(module: nn.Module, ctx: DistributedContext, find_unused_parameters: bool = False) -> nn.Module:
    """DDP around `module` in a multi-process run; the module itself otherwise."""
    if not ctx.is_distributed:
        return module
    device_ids = [ctx.local_rank] if ctx.device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def broadcast(value: Any, ctx: DistributedContext) -> Any:
    """Rank 0's `value` on every process (picklable objects)."""
    if not ctx.is_distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, ctx: DistributedContext) -> list[Any] | None:
    """Every process's `value`, in rank order, on rank 0 (None elsewhere)."""
    if not ctx.is_distributed:
        return [value]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def all_sum(values: dict[str, float], ctx: DistributedContext) -> dict[str, float]:
    """Sum of each value over the processes (the same keys on every process)."""
    if not ctx.is_distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if ctx.backend == "nccl":
        tensor = tensor.to(ctx.device)
    dist.all_reduce(tensor)
    return {k: float(v) for k, v in zip(keys, tensor.cpu().tolist())}
