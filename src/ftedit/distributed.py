"""Data parallelism under ``accelerate launch``: the training loop is the same in one process or in many.

ftedit's loop does not call the model's ``forward`` as a whole (it runs cached prefix activations through the
trainable blocks and applies the LM head at target positions only), so wrapping the model in
``DistributedDataParallel`` would not synchronize anything. Instead each process scores its share of every
micro-batch and the gradients of the trainable parameters are summed across processes before the optimizer
step: the same arithmetic as DDP's all-reduce, through accelerate's collectives (gloo on CPU, NCCL on GPU).
Every process holds the whole model, the same plan (same seed) and, after each step, the same weights.
"""

from __future__ import annotations

import torch
from torch import nn


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

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, idx: list[int]) -> list[int]:
        return idx[self.rank::self.world] if self.distributed else idx

    def sum_gradients(self, params: list[nn.Parameter], loss: float) -> float:
        """Sum the gradients of ``params`` over processes in place; return the summed loss."""
        if not self.distributed:
            return loss
        from accelerate.utils import reduce

        for p in params:
            if p.grad is None:  # this process had no example in the batch: it contributes zeros
                p.grad = torch.zeros_like(p)
            p.grad.copy_(reduce(p.grad, reduction="sum"))
        return float(reduce(torch.tensor([loss], device=params[0].device), reduction="sum").item())

    def wait(self) -> None:
        if self.distributed:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


__all__ = ["DataParallel"]
