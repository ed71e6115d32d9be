"""What the hypernetwork editors MEND and MALMEN share: the edit gradient's rank-one factors, the shift
generator that transforms them, and forwards with a weight shift applied.

For a linear layer ``y = W x`` the gradient of a loss over tokens ``t`` is ``∇W = Σ_t δ_t u_tᵀ`` with
``u_t`` the layer's input and ``δ_t = ∂loss/∂y_t``: :func:`edit_factors` reads both with hooks, without ever
forming ``∇W``. A :class:`ShiftGenerator` (MEND's low-rank MLP over the normalized ``[u; δ]``, one per weight
shape, shared by the layers of that shape with a per-layer scale and offset) maps them to ``(ũ, δ̃)``.

MEND turns them into ``ΔW = −lr · Σ_t δ̃_t ũ_tᵀ``; MALMEN into the least-squares shift that maps every key
``u_t`` to its value shift ``−lr · δ̃_t`` (:func:`normal_equation_shift`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ftedit.forward import hidden_entering, lm_parts, per_example_nll, prefix_replaced
from ftedit.params import Target, find_blocks, select_targets, weight_out_in
from ftedit.tokenization import PaddedBatch


@dataclass
class NetConfig:
    """The edited weights and the shift generator's shape (MEND: the last 3 layers' MLP, rank 1920)."""

    layers: str = "-3:"  # edited blocks, as params.layers ("-3:": the last three)
    modules: str = "down,up"  # MLP roles edited in each block
    rank: int = 64  # rank of each low-rank layer of the generator (MEND: 1920)
    n_hidden: int = 1  # low-rank residual layers (MEND: 1)
    init_lr: float = 1e-4  # initial per-weight edit step size (learned; MEND's edit_lr)


def edited_targets(model: nn.Module, cfg: NetConfig) -> list[Target]:
    return select_targets(model, cfg.layers, cfg.modules)


def target_shape(target: Target) -> tuple[int, int]:
    d_out, d_in = weight_out_in(target.module).shape
    return int(d_in), int(d_out)


# ------------------------------------------------------------------------------------------ the network


class RunningNorm(nn.Module):
    """Per-feature statistics of everything observed (Chan's parallel update of mean and variance)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        n, mean = x.shape[0], x.mean(0)
        total = self.count + n
        diff = mean - self.mean
        self.m2 += ((x - mean) ** 2).sum(0) + diff ** 2 * self.count * n / total
        self.mean += diff * n / total
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # scaled by the root mean square, not centred: then the fresh (identity) generator's shift is a
        # descent step, a diagonally preconditioned gradient step (MEND centres; it trains far longer)
        second = self.m2 / self.count.clamp_min(1) + self.mean ** 2
        return x / (second.to(x.dtype) + 1e-12).sqrt()


class LowRankBlock(nn.Module):
    """``z + (B relu(A z)) * scale[slot] + offset[slot]``; B starts at zero, so the block starts as identity."""

    def __init__(self, dim: int, rank: int, n_slots: int):
        super().__init__()
        self.a = nn.Linear(dim, rank)
        self.b = nn.Linear(rank, dim)
        nn.init.zeros_(self.b.weight)
        nn.init.zeros_(self.b.bias)
        self.scale = nn.Parameter(torch.ones(n_slots, dim))
        self.offset = nn.Parameter(torch.zeros(n_slots, dim))

    def forward(self, z: torch.Tensor, slot: int) -> torch.Tensor:
        return z + self.b(torch.relu(self.a(z))) * self.scale[slot] + self.offset[slot]


class ShiftGenerator(nn.Module):
    """MEND's editor network for one weight shape: ``(u, δ) -> (ũ, δ̃)`` over the normalized concatenation."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_hidden: int, n_slots: int):
        super().__init__()
        self.d_in = d_in
        self.norm_u, self.norm_delta = RunningNorm(d_in), RunningNorm(d_out)
        self.blocks = nn.ModuleList(LowRankBlock(d_in + d_out, rank, n_slots) for _ in range(n_hidden))

    def observe(self, u: torch.Tensor, delta: torch.Tensor) -> None:
        self.norm_u.observe(u)
        self.norm_delta.observe(delta)

    def forward(self, u: torch.Tensor, delta: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([self.norm_u(u), self.norm_delta(delta)], dim=-1)
        for block in self.blocks:
            z = block(z, slot)
        return z[:, :self.d_in], z[:, self.d_in:]


class Hypernet(nn.Module):
    """One :class:`ShiftGenerator` per weight shape, and a learned edit step size per edited weight."""

    def __init__(self, shapes: Sequence[tuple[int, int]], cfg: NetConfig):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        keys = [f"{d_in}x{d_out}" for d_in, d_out in self.shapes]
        self.routes = [(key, keys[:i].count(key)) for i, key in enumerate(keys)]  # (generator, its slot)
        self.generators = nn.ModuleDict({key: ShiftGenerator(*shape, cfg.rank, cfg.n_hidden, keys.count(key))
                                         for key, shape in zip(keys, self.shapes, strict=True)})
        self.log_lr = nn.Parameter(torch.full((len(shapes),), math.log(cfg.init_lr)))

    def observe(self, i: int, u: torch.Tensor, delta: torch.Tensor) -> None:
        self.generators[self.routes[i][0]].observe(u, delta)

    def transform(self, i: int, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key, slot = self.routes[i]
        return self.generators[key](u, delta, slot)

    def lr(self, i: int) -> torch.Tensor:
        return self.log_lr[i].exp()


# ------------------------------------------------------------------------------------------ shifts


@dataclass
class Shift:
    """A weight shift ``ΔW`` ([d_out, d_in]): ``valuesᵀ keys`` (rank-limited), or a dense ``matrix``."""

    keys: torch.Tensor | None = None  # [r, d_in]
    values: torch.Tensor | None = None  # [r, d_out]
    matrix: torch.Tensor | None = None  # [d_out, d_in]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``ΔW x`` for every row of ``x`` ([..., d_in])."""
        if self.matrix is not None:
            return x @ self.matrix.T.to(x.dtype)
        return (x @ self.keys.T.to(x.dtype)) @ self.values.to(x.dtype)

    def dense(self) -> torch.Tensor:
        return self.matrix if self.matrix is not None else self.values.T @ self.keys


def normal_equation_shift(keys: torch.Tensor, values: torch.Tensor, lam: float) -> torch.Tensor:
    """MALMEN's aggregation: the ``S`` ([d_out, d_in]) minimizing ``Σ_t ||S u_t − d_t||² + λ||S||²``.

    ``keys`` ([n, d_in]) rows are the ``u_t``, ``values`` ([n, d_out]) the ``d_t``. Normal equation:
    ``(UᵀU + λI) Sᵀ = Uᵀ D``, solved as is when ``n >= d_in``; with fewer keys than inputs the same ``S``
    comes from the n×n system, ``Sᵀ = Uᵀ (U Uᵀ + λI)⁻¹ D``. Differentiable in both arguments.
    """
    n, d_in = keys.shape
    if n >= d_in:
        gram = keys.T @ keys + lam * torch.eye(d_in, dtype=keys.dtype, device=keys.device)
        return torch.linalg.solve(gram, keys.T @ values).T
    inner = keys @ keys.T + lam * torch.eye(n, dtype=keys.dtype, device=keys.device)
    return (keys.T @ torch.linalg.solve(inner, values)).T


@contextlib.contextmanager
def shifted(targets: Sequence[Target], shifts: Sequence[Shift]):
    """Forwards inside run as if every target's weight were ``W + ΔW`` (differentiable in the shifts)."""

    def hook_for(shift: Shift):
        def hook(module, args, output):
            return output + shift.apply(args[0])
        return hook

    handles = [t.module.register_forward_hook(hook_for(s)) for t, s in zip(targets, shifts, strict=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------ factors


@dataclass
class Factors:
    """The rank-one factors of one weight's edit gradient: ``∇W = deltaᵀ u`` (rows are tokens)."""

    u: torch.Tensor  # [n, d_in] the layer's inputs
    delta: torch.Tensor  # [n, d_out] the gradient of the edit loss with respect to the layer's outputs


class Prefix:
    """A batch's hidden states entering the first edited block, computed once: the forwards of a training
    step (or an edit) then run only the blocks from there up."""

    def __init__(self, model: nn.Module, batch: PaddedBatch, first_layer: int):
        _, self.blocks = find_blocks(model)
        lm_parts(model)  # verify the body/head split now, while the real blocks are in place
        self.model, self.batch, self.k = model, batch, first_layer
        self.hidden, self.as_tuple = (None, False) if first_layer == 0 else hidden_entering(
            model, self.blocks, first_layer, batch.input_ids, batch.attention_mask)

    def rows(self, rows: torch.Tensor) -> tuple[PaddedBatch, contextlib.AbstractContextManager]:
        """The sub-batch ``rows`` and the context in which the model runs it from block ``k``."""
        b = self.batch
        sub = PaddedBatch(b.input_ids[rows], b.attention_mask[rows], b.labels[rows])
        if self.hidden is None:
            return sub, contextlib.nullcontext()
        return sub, prefix_replaced(self.blocks, self.k, self.hidden[rows], self.as_tuple)


def edit_factors(model: nn.Module, targets: Sequence[Target], batch: PaddedBatch,
                 context: contextlib.AbstractContextManager | None = None) -> list[Factors]:
    """Each target's ``(u, δ)`` at the batch's unpadded tokens, for the summed target NLL of its rows.

    ``δ`` is read as the gradient of a zero added to the layer's output, so no weight needs
    ``requires_grad`` and the weight gradient itself is never formed.
    """
    inputs: dict[int, torch.Tensor] = {}
    zeros: dict[int, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(module, args, output):
            inputs[i] = args[0].detach()
            zeros[i] = torch.zeros_like(output, requires_grad=True)
            return output + zeros[i]
        return hook

    handles = [t.module.register_forward_hook(hook_for(i)) for i, t in enumerate(targets)]
    try:
        with torch.enable_grad():
            with context or contextlib.nullcontext():
                nll, _ = per_example_nll(model, batch)
            grads = torch.autograd.grad(nll.sum(), [zeros[i] for i in range(len(targets))])
    finally:
        for h in handles:
            h.remove()
    mask = batch.attention_mask.bool()
    return [Factors(inputs[i][mask].float(), grads[i][mask].float()) for i in range(len(targets))]
