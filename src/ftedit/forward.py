"""Forward passes that apply the LM head only where a loss or metric needs it.

With a 262k-token vocabulary (Gemma 3) the LM head costs more than the rest of a small model; evaluating it
only at the positions that predict target tokens is the single largest saving in training and scoring.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ftedit.distributed import is_sharded
from ftedit.tokenization import IGNORE_INDEX, PaddedBatch

logger = logging.getLogger(__name__)


@dataclass
class LMParts:
    body: torch.nn.Module | None  # None: use the full forward (the split did not verify)
    head: torch.nn.Module | None
    softcap: float | None


_PARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _unwrap(model):
    """The causal-LM module inside a PEFT wrapper (LoRA layers stay injected, so scores include them)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _softcap_of(model) -> float | None:
    cfg = model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is None and hasattr(cfg, "get_text_config"):
        cap = getattr(cfg.get_text_config(), "final_logit_softcapping", None)
    return float(cap) if cap else None


def apply_head(parts: LMParts, hidden: torch.Tensor) -> torch.Tensor:
    logits = parts.head(hidden).float()
    if parts.softcap is not None:
        logits = torch.tanh(logits / parts.softcap) * parts.softcap
    return logits


def body_hidden(parts: LMParts, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = parts.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _split_candidate(model) -> LMParts:
    lm = _unwrap(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    body = getattr(lm, "base_model", None)
    if head is None or body is None or body is lm:
        return LMParts(None, None, None)
    return LMParts(body, head, _softcap_of(lm))


@torch.no_grad()  # not inference_mode: FSDP reuses the gathered weights in training
def _verify(model, parts: LMParts) -> bool:
    ids = torch.tensor([[1, 5, 7, 11, 3, 2]], device=model_device(model)) % model.config.get_text_config().vocab_size
    mask = torch.ones_like(ids)
    # in fp32 also inside an autocast region: bf16 rounding differs between the two paths by more than the tolerance
    with torch.autocast(ids.device.type, enabled=False) if ids.device.type in ("cpu", "cuda") \
            else contextlib.nullcontext():
        full = model(input_ids=ids, attention_mask=mask).logits.float()
        split = apply_head(parts, body_hidden(parts, ids, mask))
    scale = full.abs().max().clamp_min(1.0)
    return bool(((full - split).abs().max() / scale) < 1e-3)


def lm_parts(model) -> LMParts:
    """Body/head split of a causal LM, verified once against the full forward and cached per model."""
    parts = _PARTS.get(model)
    if parts is None:
        # FSDP gathers the root unit's weights (embeddings, head) only in the model's own forward
        parts = LMParts(None, None, None) if is_sharded(model) else _split_candidate(model)
        if parts.body is not None and not _verify(model, parts):
            logger.warning("%s: body + output embedding does not reproduce model(...).logits; "
                           "scoring falls back to the full forward (slower)", type(model).__name__)
            parts = LMParts(None, None, None)
        _PARTS[model] = parts
    return parts


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position, token) of every labelled token; the prediction for ``labels[b, t]`` is made at ``t - 1``."""
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols - 1, labels[rows, cols]


def target_token_logprobs(model: nn.Module, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of every labelled token, flattened, and the row each belongs to."""
    logits, tokens, rows = labelled_logits(model, batch)
    # fused log-softmax + gather: its backward does not materialize a second [positions, vocab] tensor
    logp = -torch.nn.functional.cross_entropy(logits, tokens, reduction="none")
    return logp, rows


def labelled_logits(model: nn.Module, batch: PaddedBatch):
    """fp32 logits at every labelled position, the labelled tokens, and the row each belongs to."""
    rows, pos, tokens = label_positions(batch.labels)
    parts = lm_parts(model)
    if parts.body is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[rows, pos].float()
    else:
        logits = apply_head(parts, body_hidden(parts, batch.input_ids, batch.attention_mask)[rows, pos])
    return logits, tokens, rows


def per_example_margin(model: nn.Module, batch: PaddedBatch) -> torch.Tensor:
    """Per example ([B]), the smallest margin over its labelled tokens of the token's logit above the best
    other token's (equal to the log-prob margin); negative where greedy decoding would leave the target."""
    logits, tokens, rows = labelled_logits(model, batch)
    target = logits.gather(1, tokens[:, None]).squeeze(1)
    other = logits.scatter(1, tokens[:, None], float("-inf")).max(dim=1).values
    out = torch.full((batch.input_ids.shape[0],), float("inf"), device=logits.device)
    return out.scatter_reduce(0, rows, target - other, reduce="amin")


def per_example_nll(model: nn.Module, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL over each example's labelled tokens ([B]) and each example's summed log-prob ([B])."""
    logp, rows = target_token_logprobs(model, batch)
    n = batch.input_ids.shape[0]
    summed = torch.zeros(n, device=logp.device, dtype=logp.dtype).index_add(0, rows, logp)
    counts = torch.zeros(n, device=logp.device, dtype=logp.dtype).index_add(0, rows, torch.ones_like(logp))
    return -summed / counts.clamp_min(1), summed


class StopForward(Exception):
    """Raised by a hook to end a forward pass early: nothing after the hooked module is needed."""


def run_until_stopped(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """``model``'s forward (no KV cache), ending quietly where a hook raises :class:`StopForward`."""
    with contextlib.suppress(StopForward):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def tapped(module: nn.Module, side: str = "output", stop: bool = True):
    """Record ``module``'s input (first argument) or output (first element) of each forward in the yielded
    dict under ``"x"``, and under ``"tuple"`` whether its output is a tuple; with ``stop`` the forward ends
    right after ``module`` (run it with :func:`run_until_stopped`)."""
    box: dict = {}

    def hook(mod, args, kwargs, output):
        box["x"] = (args[0] if args else kwargs["hidden_states"]) if side == "input" else _first(output)
        box["tuple"] = isinstance(output, tuple)
        if stop:
            raise StopForward

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


@torch.no_grad()
def hidden_entering(model: nn.Module, blocks: nn.ModuleList, k: int, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, stop: bool = True) -> tuple[torch.Tensor, bool]:
    """The hidden states entering block ``k`` (``k >= 1``: block ``k - 1``'s output) and whether the blocks
    return tuples. ``stop=False`` lets the forward finish (a sharded model's units must)."""
    with tapped(blocks[k - 1], "output", stop) as box:
        run_until_stopped(model, input_ids, attention_mask)
    return box["x"], box["tuple"]


class _Injected(nn.Module):
    """Stands in for every prefix block and returns the cached hidden states of the current batch."""

    def __init__(self, value: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.value, self.as_tuple = value, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = self.value.to(hidden_states.dtype)
        return (out,) if self.as_tuple else out


@contextlib.contextmanager
def prefix_replaced(blocks: nn.ModuleList, k: int, hidden: torch.Tensor, as_tuple: bool):
    """Blocks ``0..k-1`` replaced by ``hidden`` (the states entering block ``k``): forwards inside run only
    blocks ``k..``. The real blocks are put back on exit."""
    saved = [blocks[i] for i in range(k)]
    injected = _Injected(hidden, as_tuple)
    for i in range(k):
        blocks[i] = injected
    try:
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


class PrefixActivations:
    """Hidden states entering block ``k``, computed once per example while blocks ``0..k-1`` are frozen.

    Training then runs only blocks ``k..`` (and the head at target positions): the frozen prefix stays
    out of every epoch. Valid only while no parameter below block ``k`` changes and the inputs are fixed.
    """

    def __init__(self, model: nn.Module, k: int, pairs: list, pad_token_id: int, batch_size: int = 32,
                 storage_dtype: torch.dtype | None = None):
        from ftedit.params import find_blocks

        self.model, self.k, self.pad_token_id = model, k, pad_token_id
        _, self.blocks = find_blocks(model)
        self.storage_dtype = storage_dtype
        lm_parts(model)  # verify the body/head split now, while the real blocks are in place
        self.hidden: list[torch.Tensor] = []
        self.as_tuple = False
        self._capture(pairs, batch_size)

    @torch.no_grad()
    def _capture(self, pairs, batch_size: int) -> None:
        from ftedit.tokenization import pad_right

        device = next(self.model.parameters()).device
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = pad_right(chunk, self.pad_token_id).to(device)
            # the suffix is not needed, except that a sharded model's units must finish their forward
            # (FSDP reshards in its post-forward hooks)
            h, self.as_tuple = hidden_entering(self.model, self.blocks, self.k, batch.input_ids,
                                               batch.attention_mask, stop=not is_sharded(self.model))
            dtype = self.storage_dtype or h.dtype
            self.hidden += [h[i, :len(p.input_ids)].to(dtype) for i, p in enumerate(chunk)]

    def stacked(self, indices: list[int], width: int, device) -> torch.Tensor:
        rows = [self.hidden[i] for i in indices]
        out = torch.zeros(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype, device=device)
        for r, h in enumerate(rows):
            out[r, :h.shape[0]] = h
        return out

    def nll(self, indices: list[int], pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`per_example_nll` of ``pairs`` (the examples at ``indices``), running only blocks ``k..``."""
        return self.run(per_example_nll, indices, pairs)

    def run(self, fn, indices: list[int], pairs: list):
        """``fn(model, batch)`` on ``pairs`` (the examples at ``indices``), running only blocks ``k..``."""
        from ftedit.tokenization import pad_right

        device = next(self.model.parameters()).device
        batch = pad_right(pairs, self.pad_token_id).to(device)
        with prefix_replaced(self.blocks, self.k, self.stacked(indices, batch.input_ids.shape[1], device),
                             self.as_tuple):
            return fn(self.model, batch)
