"""Parameter selection: which layers and modules an edit may change, resolved from the model's structure.

Nothing here looks at the model's name. The decoder blocks are the model's ``nn.ModuleList`` of identical
blocks whose length is the configured layer count; inside a block, each linear layer gets a role from its
position (under the attention or the MLP submodule) and its attribute name, checked against its shape.

Roles: MLP ``up``, ``gate``, ``down``; attention ``q``, ``k``, ``v``, ``o`` and fused ``qkv``.
Groups: ``mlp`` (all MLP roles), ``attn`` (all attention roles), ``block`` (every parameter of the block).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

MLP_ROLES = ("up", "gate", "down")
ATTN_ROLES = ("q", "k", "v", "o", "qkv")
GROUPS = {"mlp": MLP_ROLES, "attn": ATTN_ROLES}

# Attribute names of linear layers across GPT-2, GPT-J, GPT-NeoX, OPT, Phi, Falcon and Llama-style models.
_MLP_NAMES = {
    "down_proj": "down", "c_proj": "down", "fc_out": "down", "dense_4h_to_h": "down", "fc2": "down", "w2": "down",
    "up_proj": "up", "c_fc": "up", "fc_in": "up", "dense_h_to_4h": "up", "fc1": "up", "w3": "up",
    "gate_up_proj": "up", "gate_proj": "gate", "w1": "gate",
}
_ATTN_NAMES = {
    "q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
    "o_proj": "o", "out_proj": "o", "c_proj": "o", "dense": "o",
    "c_attn": "qkv", "query_key_value": "qkv", "qkv_proj": "qkv", "Wqkv": "qkv",
}
_ATTN_PARENTS = ("attn", "attention", "self_attn", "self_attention")
_MLP_PARENTS = ("mlp", "feed_forward", "ffn")


class SelectionError(ValueError):
    """The requested layers/modules do not exist in this model."""


@dataclass(frozen=True)
class Target:
    """One selected module: ``name`` is its full dotted path in the model."""

    name: str
    layer: int
    role: str  # a role from MLP_ROLES/ATTN_ROLES, or "block"
    module: nn.Module


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer that stores its weight transposed, ``[in, out]``."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as ``[d_out, d_in]`` (a view: writing to it writes the weight)."""
    return module.weight.T if is_conv1d(module) else module.weight


def _in_out(module: nn.Module) -> tuple[int, int]:
    d_out, d_in = weight_out_in(module).shape
    return d_in, d_out


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's list of transformer blocks and its dotted path."""
    cfg = getattr(model, "config", None)
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and (n_layers is None or len(module) == n_layers):
                candidates.append((name, module))
    if not candidates:
        raise SelectionError(f"cannot find the transformer blocks of {type(model).__name__}")
    # The outermost list is the decoder's (inner lists, e.g. experts, are nested deeper).
    return min(candidates, key=lambda c: c[0].count("."))


def block_roles(block: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Map each role present in one block to ``(relative name, module)``."""
    roles: dict[str, tuple[str, nn.Module]] = {}
    for rel, module in block.named_modules():
        if not rel or not is_linear(module):
            continue
        parts = rel.split(".")
        leaf, parents = parts[-1], parts[:-1]
        in_attn = any(p in _ATTN_PARENTS for p in parents)
        in_mlp = any(p in _MLP_PARENTS for p in parents) or (not parents and leaf in ("fc1", "fc2"))
        table = _ATTN_NAMES if in_attn else _MLP_NAMES if in_mlp else {}
        role = table.get(leaf)
        if role is None or role in roles:
            continue
        roles[role] = (rel, module)
    _check_mlp_shapes(roles)
    return roles


def _check_mlp_shapes(roles: dict[str, tuple[str, nn.Module]]) -> None:
    if "down" in roles and "up" in roles:
        down_in, down_out = _in_out(roles["down"][1])
        up_in, up_out = _in_out(roles["up"][1])
        if down_out != up_in:
            raise SelectionError(
                f"MLP shapes do not fit the up/down roles: {roles['up'][0]} is {up_in}->{up_out}, "
                f"{roles['down'][0]} is {down_in}->{down_out}"
            )


def parse_layers(spec: str | int | list[int] | tuple[int, ...], n_layers: int) -> list[int]:
    """Layers from ``[15, 16]``, ``"15,16"``, ``"-3:"`` (last three), ``"4:8"``, ``"all"`` or ``"frac:0.66"``.

    Negative indices count from the end; ``frac:x`` is the layer at relative depth x (0 first, 1 last).
    """
    if isinstance(spec, int):
        items: list[int] = [spec]
    elif isinstance(spec, list | tuple):
        items = [int(x) for x in spec]
    elif spec == "all":
        items = list(range(n_layers))
    elif spec.startswith("frac:"):
        items = [round(float(spec[5:]) * (n_layers - 1))]
    elif ":" in spec:
        start, _, stop = spec.partition(":")
        items = list(range(n_layers))[slice(int(start) if start else None, int(stop) if stop else None)]
    else:
        items = [int(x) for x in spec.split(",") if x.strip()]
    resolved = sorted({i % n_layers if -n_layers <= i < n_layers else i for i in items})
    bad = [i for i in resolved if not 0 <= i < n_layers]
    if bad or not resolved:
        raise SelectionError(f"layers {spec!r} are outside this model's 0..{n_layers - 1}")
    return resolved


def expand_modules(modules: str | list[str] | tuple[str, ...]) -> list[str]:
    names = [m.strip() for m in modules.split(",")] if isinstance(modules, str) else list(modules)
    roles: list[str] = []
    for m in names:
        if m in GROUPS:
            roles += GROUPS[m]
        elif m in MLP_ROLES or m in ATTN_ROLES or m == "block":
            roles.append(m)
        else:
            raise SelectionError(f"unknown module {m!r}; use roles {MLP_ROLES + ATTN_ROLES}, groups {list(GROUPS)} or 'block'")
    return list(dict.fromkeys(roles))


def select_targets(model: nn.Module, layers, modules) -> list[Target]:
    """Resolve ``layers`` x ``modules`` to concrete modules of ``model``."""
    prefix, blocks = find_blocks(model)
    layer_ids = parse_layers(layers, len(blocks))
    roles = expand_modules(modules)
    targets: list[Target] = []
    for i in layer_ids:
        if "block" in roles:
            targets.append(Target(f"{prefix}.{i}", i, "block", blocks[i]))
            continue
        present = block_roles(blocks[i])
        wanted_groups = {g for g, rs in GROUPS.items() if any(r in rs for r in roles)}
        found = [r for r in roles if r in present]
        for r in found:
            rel, module = present[r]
            targets.append(Target(f"{prefix}.{i}.{rel}", i, r, module))
        # A group request ("attn") is satisfied by whatever roles the block has (fused qkv or q/k/v).
        if not found or (not wanted_groups and len(found) < len(roles)):
            missing = [r for r in roles if r not in present]
            raise SelectionError(f"layer {i} has no module for {missing}; it has {sorted(present)}")
    return targets


def trainable_parameters(targets: list[Target]) -> dict[str, nn.Parameter]:
    """The parameters full-weight fine-tuning updates: a block's all, a linear layer's weight (not its bias)."""
    params: dict[str, nn.Parameter] = {}
    for t in targets:
        if t.role == "block":
            params.update({f"{t.name}.{n}": p for n, p in t.module.named_parameters()})
        else:
            params[f"{t.name}.weight"] = t.module.weight
    return params


def freeze_all_but(model: nn.Module, params: dict[str, nn.Parameter]) -> int:
    """Make exactly ``params`` trainable; return their element count."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return sum(p.numel() for p in params.values())


def first_trainable_layer(targets: list[Target]) -> int:
    return min(t.layer for t in targets)


class NormConstraint:
    """FT-L (ROME/MEMIT): keep every updated weight within ``eps`` of its original value, elementwise."""

    def __init__(self, params: dict[str, nn.Parameter], eps: float):
        self.eps = eps
        self.originals = {n: p.detach().clone() for n, p in params.items()}
        self.params = params

    @torch.no_grad()
    def apply(self) -> None:
        for name, p in self.params.items():
            orig = self.originals[name]
            p.copy_(torch.minimum(torch.maximum(p, orig - self.eps), orig + self.eps))
