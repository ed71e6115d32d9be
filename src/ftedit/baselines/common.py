"""What ROME, MEMIT and AlphaEdit share: hyperparameter resolution, the down projection as a matrix,
subject-token keys, the optimized value vector and the undo snapshot.

Conventions: a down projection maps a key ``k`` (its input, ``d_in``) to a value (its output, ``d_out``).
Updates are computed as ``[d_out, d_in]`` matrices whatever the module stores (GPT-2's Conv1D keeps the
transpose); :func:`add_update` writes them into the module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftedit.config import merge_sources
from ftedit.data.requests import EditRequest
from ftedit.errors import InputError
from ftedit.forward import (
    apply_head,
    body_hidden,
    hidden_entering,
    label_positions,
    lm_parts,
    model_device,
    prefix_replaced,
    run_until_stopped,
    tapped,
)
from ftedit.params import Target, find_blocks, parse_layers, select_targets, weight_out_in
from ftedit.registry import AppliedEdit, ApplyContext, TouchedModule
from ftedit.tokenization import EncodedPair, encode_pair, encode_prompt, pad_right

logger = logging.getLogger(__name__)


class BaselineError(InputError):
    """A baseline cannot run on this input (names the request or setting at fault)."""


# ------------------------------------------------------------------------------------------ hyperparameters


def resolve_hparams(cls, config_file: str | Path | None = None,
                    overrides: list[str] | dict[str, Any] | None = None):
    """Defaults of ``cls`` < a YAML/TOML ``config_file`` < ``overrides`` ("key=value" strings or a dict)."""
    return merge_sources(cls(), config_file, overrides)


def resolve_layers(spec: str | int | list[int], n_layers: int) -> list[int]:
    """:func:`ftedit.params.parse_layers`, plus ``"frac:a:b"``: every layer from relative depth a to b."""
    if isinstance(spec, str) and spec.startswith("frac:") and spec.count(":") == 2:
        _, lo, hi = spec.split(":")
        first, last = (round(float(x) * (n_layers - 1)) for x in (lo, hi))
        return parse_layers(f"{first}:{last + 1}", n_layers)
    return parse_layers(spec, n_layers)


@dataclass
class ValueConfig:
    """How the target value (ROME's v*, MEMIT's z) is optimized: the ROME/MEMIT ``v_*`` hyperparameters."""

    steps: int = 20  # v_num_grad_steps: Adam steps on the residual delta
    lr: float = 0.5  # v_lr
    weight_decay: float = 0.5  # v_weight_decay: times ||delta|| / ||initial value||^2
    # weight of KL(edited || original) on "{subject} is a" (ROME's equation 4 and code), keeps the subject's essence
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0  # ||delta|| <= factor * ||initial value||
    loss_break: float = 5e-2  # stop once the total loss is below this
    context_seeds: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")  # starts of the prefixes
    context_lengths: tuple[int, ...] = (10,)  # token lengths of the greedy prefixes, one prefix per seed each


# ------------------------------------------------------------------------------------------ the weights


def down_proj(model: nn.Module, layer: int) -> Target:
    return select_targets(model, [layer], "down")[0]


@torch.no_grad()
def add_update(module: nn.Module, delta_out_in: torch.Tensor) -> None:
    weight_out_in(module).add_(delta_out_in.to(device=module.weight.device, dtype=module.weight.dtype))


@dataclass
class Snapshot:
    """Copies of the weights a baseline is about to change; ``restore()`` writes them back exactly."""

    model: nn.Module
    saved: dict[str, torch.Tensor] = field(default_factory=dict)

    def keep(self, target: Target) -> None:
        if target.name not in self.saved:
            self.saved[target.name] = target.module.weight.detach().clone()

    @torch.no_grad()
    def restore(self) -> nn.Module:
        modules = dict(self.model.named_modules())
        for name, weight in self.saved.items():
            modules[name].weight.copy_(weight)
        return self.model


# ------------------------------------------------------------------------------------------ prompts and positions


def context_prefixes(model: nn.Module, tok, cfg: ValueConfig) -> list[str]:
    """``""`` plus one greedy continuation of each seed per length, each ending in ". " (ROME/MEMIT's
    context templates; greedy instead of sampled so that an edit is reproducible)."""
    prefixes = [""]
    device = model_device(model)
    for length in cfg.context_lengths:
        for seed in cfg.context_seeds:
            ids = torch.tensor([encode_prompt(tok, seed)], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0], skip_special_tokens=True).replace("{", " ").replace("}", " ").strip()
            prefixes.append(text + ". ")
    return prefixes


def subject_end(prompt: str, subject: str, request: EditRequest | None = None) -> int:
    at = prompt.find(subject)
    if at < 0:
        where = f" (request {request.origin.file}#{request.origin.index})" if request and request.origin.file else ""
        raise BaselineError(f"subject {subject!r} does not occur in prompt {prompt!r}{where}: the closed-form "
                            "editors need the subject's last token")
    return at + len(subject)


def last_token_before(tok, text: str, end: int) -> int:
    """Index, in ``encode_prompt(tok, text)``, of the token holding character ``end - 1`` of ``text``."""
    ids = encode_prompt(tok, text)
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        spans = enc["offset_mapping"][:len(ids)]
        inside = [i for i, (s, e) in enumerate(spans) if e > s and s < end]
        if inside:
            return inside[-1]
    return len(encode_prompt(tok, text[:end])) - 1


@dataclass
class Probe:
    """One sequence to run, and the position of the subject's last token in it."""

    pair: EncodedPair
    position: int


def rewrite_probes(tok, request: EditRequest, prefixes: Sequence[str], target: str | None) -> list[Probe]:
    """``prefix + prompt (+ target)`` for every prefix, with the subject's last-token position."""
    end = subject_end(request.prompt, request.subject, request)
    probes = []
    for prefix in prefixes:
        text = prefix + request.prompt
        pos = last_token_before(tok, text, len(prefix) + end)
        if target is None:
            ids = tuple(encode_prompt(tok, text))
            pair = EncodedPair(ids, len(ids))
        else:
            pair = encode_pair(tok, text, target)
        probes.append(Probe(pair, pos))
    return probes


def essence_probe(tok, subject: str) -> Probe:
    """ROME's KL prompt "{subject} is a", at the subject's last token."""
    text = f"{subject} is a"
    ids = tuple(encode_prompt(tok, text))
    return Probe(EncodedPair(ids, len(ids)), last_token_before(tok, text, len(subject)))


# ------------------------------------------------------------------------------------------ reading activations


@torch.no_grad()
def activations_at(model: nn.Module, tok, probes: Sequence[Probe], module: nn.Module, side: str = "input",
                   batch_size: int = 32) -> torch.Tensor:
    """``module``'s input or output at each probe's position, ``[len(probes), d]`` (float32).

    The forward stops right after ``module``: later layers are not computed.
    """
    device = model_device(model)
    rows: list[torch.Tensor] = []
    with tapped(module, side) as grabbed:
        for start in range(0, len(probes), batch_size):
            chunk = probes[start:start + batch_size]
            batch = pad_right([p.pair for p in chunk], tok.pad_token_id).to(device)
            run_until_stopped(model, batch.input_ids, batch.attention_mask)
            x = grabbed.pop("x")
            rows.append(x[torch.arange(len(chunk), device=device), torch.tensor([p.position for p in chunk],
                                                                                 device=device)].float())
    return torch.cat(rows)


def mean_keys(model, tok, requests: Sequence[EditRequest], prefixes: Sequence[str], layer: int) -> torch.Tensor:
    """k* per request: the down projection's input at the subject's last token, averaged over the prefixes.
    Returns ``[d_in, n_requests]`` (keys as columns, as in the MEMIT paper)."""
    probes = [p for r in requests for p in rewrite_probes(tok, r, prefixes, None)]
    keys = activations_at(model, tok, probes, down_proj(model, layer).module, "input")
    return keys.view(len(requests), len(prefixes), -1).mean(1).T.double()


# ------------------------------------------------------------------------------------------ the value optimization


@contextlib.contextmanager
def _frozen(model: nn.Module):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class ValueProblem:
    """ROME's v* / MEMIT's z optimization for one request: find ``delta`` such that adding it to the output of
    layer ``layer``'s down projection, at the subject's last token of every prompt, makes the model say the new target (NLL), while the
    next-token distribution after "{subject} is a" stays close to the original (KL) and ``delta`` stays small.

    Blocks below ``layer`` are frozen and computed once (their outputs are cached), so each step runs only
    the blocks from ``layer`` up and the LM head at the positions the loss needs.
    """

    def __init__(self, model, tok, request: EditRequest, prefixes: Sequence[str], layer: int,
                 reference_norm: float | None = None):
        # the norm that weight decay and the clamp are relative to (default: the initial down output's)
        self.model, self.layer, self.reference_norm = model, layer, reference_norm
        self.rewrite = rewrite_probes(tok, request, prefixes, request.target_new)
        self.essence = essence_probe(tok, request.subject)
        probes = self.rewrite + [self.essence]
        device = model_device(model)
        self.batch = pad_right([p.pair for p in probes], tok.pad_token_id).to(device)
        self.rows = torch.arange(len(probes), device=device)
        self.cols = torch.tensor([p.position for p in probes], device=device)
        self.parts = lm_parts(model)  # verified with the real blocks in place
        _, self.blocks = find_blocks(model)
        self.cached, self.as_tuple = (None, False) if layer == 0 else hidden_entering(
            model, self.blocks, layer, self.batch.input_ids, self.batch.attention_mask)
        self.initial: torch.Tensor | None = None  # the down output at the bare prompt before any delta

    @contextlib.contextmanager
    def _delta_applied(self, delta: torch.Tensor):
        def hook(mod, args, output):
            if self.initial is None:
                self.initial = output[0, self.cols[0]].detach().float()
            return output.index_put((self.rows, self.cols), output[self.rows, self.cols] + delta)

        handle = down_proj(self.model, self.layer).module.register_forward_hook(hook)
        try:
            with prefix_replaced(self.blocks, self.layer, self.cached, self.as_tuple):
                yield
        finally:
            handle.remove()

    def log_probs(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target-token log-probs, the row of each, log-softmax at the essence prompt's subject token)."""
        rows, pos, tokens = label_positions(self.batch.labels)
        er, ec = self.rows[-1:], self.cols[-1:]
        with self._delta_applied(delta):
            if self.parts.body is None:
                logits = self.model(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask,
                                    use_cache=False).logits.float()
                target_logits, essence_logits = logits[rows, pos], logits[er, ec]
            else:
                hidden = body_hidden(self.parts, self.batch.input_ids, self.batch.attention_mask)
                target_logits = apply_head(self.parts, hidden[rows, pos])
                essence_logits = apply_head(self.parts, hidden[er, ec])
        logp = -F.cross_entropy(target_logits, tokens, reduction="none")
        return logp, rows, F.log_softmax(essence_logits, dim=-1)

    def solve(self, cfg: ValueConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Return (delta, the initial down output at the bare prompt, a log of the final losses)."""
        hidden_size = weight_out_in(down_proj(self.model, self.layer).module).shape[0]
        delta = torch.zeros(hidden_size, device=self.batch.input_ids.device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.lr)
        n_rewrite = len(self.rewrite)
        kl_init, info = None, {}
        with _frozen(self.model):
            for step in range(cfg.steps):
                opt.zero_grad()
                logp, rows, essence = self.log_probs(delta)
                kl_init = essence.detach() if kl_init is None else kl_init
                per_row = torch.zeros(n_rewrite, device=logp.device).index_add(0, rows, logp)
                counts = torch.zeros(n_rewrite, device=logp.device).index_add(0, rows, torch.ones_like(logp))
                nll = -(per_row / counts).mean()
                # F.kl_div(input, target) is KL(target || input): the edited distribution comes first
                kl = cfg.kl_factor * F.kl_div(kl_init, essence, log_target=True, reduction="batchmean")
                reference = self.reference_norm or self.initial.norm()
                decay = cfg.weight_decay * delta.norm() / reference ** 2
                loss = nll + kl + decay
                info = {"steps": step + 1, "loss": loss.item(), "nll": nll.item(), "kl": kl.item()}
                if loss.item() < cfg.loss_break or step == cfg.steps - 1:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    limit = cfg.clamp_norm_factor * reference
                    if delta.norm() > limit:
                        delta.mul_(limit / delta.norm())
        return delta.detach(), self.initial, info


# ------------------------------------------------------------------------------------------ after the MLP


_POST_MLP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {layer: module or None}


@torch.no_grad()
def post_mlp_module(model: nn.Module, layer: int) -> nn.Module | None:
    """The module that receives the down projection's output inside its block, if any (Gemma's
    post-feedforward norm), found by following the data in one forward pass, not by name. ``None`` when the
    output goes straight into the residual sum (GPT-2, Llama)."""
    known = _POST_MLP.setdefault(model, {})
    if layer in known:
        return known[layer]
    _, blocks = find_blocks(model)
    target = down_proj(model, layer)
    prefix = target.name.rsplit(".", 1)[0] + "."  # the MLP that owns the down projection
    seen: dict[str, Any] = {}
    found: list[nn.Module] = []

    def grab(mod, args, output):
        seen["out"] = output

    def check(mod, args):
        if args and "out" in seen and args[0] is seen["out"]:
            found.append(mod)

    block_prefix = target.name.split(f".{layer}.", 1)[0] + f".{layer}."
    handles = [target.module.register_forward_hook(grab)]
    for name, mod in model.named_modules():
        if name.startswith(block_prefix) and not name.startswith(prefix) and name != target.name:
            handles.append(mod.register_forward_pre_hook(check))
    ids = torch.tensor([[1, 2, 3]], device=model_device(model)) % model.config.get_text_config().vocab_size
    try:
        with tapped(blocks[layer]):
            run_until_stopped(model, ids, torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    known[layer] = found[0] if found else None
    return known[layer]


def residual_to_down(post: nn.Module | None, current: torch.Tensor, residual: torch.Tensor,
                     iterations: int = 50) -> torch.Tensor:
    """The change of the down projection's output (``[n, d]``) that moves the block's output by ``residual``.

    Identity when the output is summed into the residual directly; otherwise a least-squares solve of
    ``post(current + x) = post(current) + residual`` (L-BFGS, a few milliseconds), then the smallest change
    with the same effect (:func:`_least_change`).
    """
    if post is None:
        return residual
    dtype = next(post.parameters()).dtype if any(True for _ in post.parameters()) else current.dtype
    with torch.no_grad(), _frozen(post):
        goal = post(current.to(dtype)).float() + residual
    x = residual.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (post((current + x).to(dtype)).float() - goal).pow(2).sum()
        loss.backward()
        return loss

    with _frozen(post):
        opt.step(closure)
    return _least_change(post, current, x.detach(), dtype)


@torch.no_grad()
def _least_change(post: nn.Module, current: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rescale ``current + x`` to the multiple closest to ``current`` where ``post`` cannot tell the difference.

    A norm ignores its input's scale, and gradient steps on a scale-invariant loss only ever grow that scale,
    so the solve can return a needlessly huge ``x``; MEMIT would then have to write it. Rows where rescaling
    changes ``post``'s output (no norm, or a sign flip) keep ``x``.
    """
    v = current + x
    scale = (v * current).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True).clamp_min(1e-30)
    candidate = v * scale
    with _frozen(post):
        before, after = post(v.to(dtype)).float(), post(candidate.to(dtype)).float()
    same = (after - before).norm(dim=-1) <= 1e-4 * before.norm(dim=-1).clamp_min(1e-12)
    return torch.where(same[:, None] & (scale > 0), candidate - current, x)


# ------------------------------------------------------------------------------------------ result


def applied_edit(method: str, model: nn.Module, hparams, targets: Sequence[Target], snapshot: Snapshot,
                 seconds: float, log: dict[str, Any] | None = None) -> AppliedEdit:
    return AppliedEdit(method=method, model=model, config=dataclasses.asdict(hparams),
                       touched=[TouchedModule(t.name, t.layer, t.role) for t in targets], weights="full",
                       seconds=seconds, restore_weights=snapshot.restore, seed=hparams.seed,
                       trainable_parameters=sum(t.module.weight.numel() for t in targets),
                       phase_seconds={"edit": seconds}, log=log or {})


def method_entry(method: str, apply_to_model):
    """The registry's apply function of a closed-form baseline: run ``apply_to_model`` with the resolved
    hyperparameters and return an ``AppliedEdit``."""

    def apply(model: nn.Module, tok, requests: Sequence[EditRequest], hparams, context: ApplyContext) -> AppliedEdit:
        start = time.perf_counter()
        snapshot, targets, log = apply_to_model(model, tok, requests, hparams, fingerprint=context.model_fingerprint,
                                                progress=context.progress)
        return applied_edit(method, model, hparams, targets, snapshot, time.perf_counter() - start, log=log)

    apply.__name__ = apply.__qualname__ = f"apply_{method}"
    return apply


def least_squares_update(keys: torch.Tensor, residuals: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``R Kᵀ (gram + K Kᵀ)⁻¹`` ([d_out, d_in]), the minimizer of ||ΔW K − R||² + tr(ΔW gram ΔWᵀ)."""
    keys, residuals = keys.double(), residuals.double()
    solved = torch.linalg.solve(gram.double() + keys @ keys.T, keys)  # (gram + K Kᵀ)⁻¹ K, symmetric system
    return residuals @ solved.T

