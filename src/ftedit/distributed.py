"""Data parallelism under ``accelerate launch``: the training loop is the same in one process or in many.

ftedit's loop does not call the model's ``forward`` as a whole (it runs cached prefix activations through the
trainable blocks and applies the LM head at target positions only), so wrapping the model in
``DistributedDataParallel`` would not synchronize anything. Instead each process scores its share of every
micro-batch and the gradients of the trainable parameters are summed across processes before the optimizer
step: the same arithmetic as DDP's all-reduce, through accelerate's collectives (gloo on CPU, NCCL on GPU).
Every process holds the whole model, the same plan (same seed) and, after each step, the same weights.

For models that do not fit one device, ``accelerate launch`` with an FSDP configuration (or
``ACCELERATE_USE_FSDP=true`` under ``torchrun``) shards them with PyTorch's FSDP2 (``fully_shard``): every
decoder block is one unit, the rest of the model (embeddings, final norm, LM head) the root unit. Each
process then holds a 1/N shard of every weight; a unit's weights are gathered just for its forward and
backward, and the trainable weights' gradients are reduce-scattered (averaged; the loop scales its loss by N
so that they are summed, as above). The loop is the same; scoring runs the model's whole forward, because
calling the body and head separately would skip the root unit's gathering.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class DataParallel:
    """This process's share of each micro-batch, and gradient/loss sums over all processes."""

    def __init__(self) -> None:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # reads the launcher's environment (a plain run is one process); accelerate sets up gloo on CPU
        # only when asked for CPU, as `accelerate launch --cpu` does through ACCELERATE_USE_CPU
        cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)
        self.world, self.rank, self.device = state.num_processes, state.process_index, state.device
        self.is_main = state.is_main_process
        self.sharded = self.world > 1 and parse_flag_from_env("ACCELERATE_USE_FSDP")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, idx: list[int]) -> list[int]:
        return idx[self.rank::self.world] if self.distributed else idx

    def sum_gradients(self, params: list[nn.Parameter], loss: float) -> float:
        """Sum the gradients of ``params`` over processes in place; return the summed loss.

        Sharded (FSDP) weights got theirs reduce-scattered in backward already."""
        if not self.distributed:
            return loss
        from accelerate.utils import reduce

        for p in params:
            if is_dtensor(p):
                continue
            if p.grad is None:  # this process had no example in the batch: it contributes zeros
                p.grad = torch.zeros_like(p)
            p.grad.copy_(reduce(p.grad, reduction="sum"))
        return float(reduce(torch.tensor([loss], device=params[0].device), reduction="sum").item())

    def wait(self) -> None:
        if self.distributed:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def close(self) -> None:
        """End a finished run by tearing the process group down. A process that exits with its group alive can
        abort (gloo: "terminate called without an active exception", seen once on a rank that finished while rank
        0 was saving) and take the launch down with it. No barrier: after the last collective only rank 0 works,
        and saving a large model can outlast a barrier's timeout."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s weights are FSDP shards (DTensors)."""
    return any(is_dtensor(p) for p in model.parameters())


def shard_model(model: nn.Module, parallel: DataParallel) -> nn.Module:
    """Shard ``model`` in place across the processes with FSDP2: one unit per decoder block, the rest in the
    root unit. Weights move to this process's device; which weights train may be chosen afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ftedit.params import find_blocks

    mesh = init_device_mesh(parallel.device.type, (parallel.world,))
    _, blocks = find_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    logger.info("FSDP: %d decoder blocks and the root sharded across %d processes", len(blocks), parallel.world)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, gathered on CPU in the main process (empty elsewhere).
    Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


__all__ = ["DataParallel", "full_state_dict", "is_sharded", "shard_model"]
