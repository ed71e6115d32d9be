"""Forward passes that apply the LM head only where a loss or metric needs it.

With a 262k-token vocabulary (Gemma 3) the LM head costs more than the rest of a small model; evaluating it
only at the positions that predict target tokens is the single largest saving in training and scoring.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ftedit.tokenization import IGNORE_INDEX, PaddedBatch


def decoder_body(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (``model.model`` for Llama/Gemma, ``model.transformer`` for GPT-2)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise TypeError(f"cannot find the decoder body of {type(model).__name__}")
    return body


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM head on selected hidden states, with the final logit soft-capping some models use (Gemma 2/3)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position, token) of every labelled token; the prediction for ``labels[b, t]`` is made at ``t - 1``."""
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols - 1, labels[rows, cols]


def target_token_logprobs(model: nn.Module, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of every labelled token, flattened, and the row each belongs to."""
    hidden = decoder_body(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    rows, pos, tokens = label_positions(batch.labels)
    logits = head_logits(model, hidden[rows, pos]).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return logp, rows


def per_example_nll(model: nn.Module, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL over each example's labelled tokens ([B]) and each example's summed log-prob ([B])."""
    logp, rows = target_token_logprobs(model, batch)
    n = batch.input_ids.shape[0]
    summed = torch.zeros(n, device=logp.device, dtype=logp.dtype).index_add(0, rows, logp)
    counts = torch.zeros(n, device=logp.device, dtype=logp.dtype).index_add(0, rows, torch.ones_like(logp))
    return -summed / counts.clamp_min(1), summed


class _StopForward(Exception):
    pass


class _Injected(nn.Module):
    """Stands in for every frozen prefix block and returns the cached hidden states of the current batch."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple
        self.value: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        out = self.value.to(hidden_states.dtype)
        return (out,) if self.as_tuple else out


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
        self.hidden: list[torch.Tensor] = []
        self.as_tuple = False
        self._capture(pairs, batch_size)

    @torch.no_grad()
    def _capture(self, pairs, batch_size: int) -> None:
        from ftedit.tokenization import pad_right

        captured: dict[str, torch.Tensor] = {}

        def grab(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _StopForward

        def kind(module, args, output):
            self.as_tuple = isinstance(output, tuple)

        device = next(self.model.parameters()).device
        handles = [self.blocks[self.k].register_forward_pre_hook(grab, with_kwargs=True),
                   self.blocks[self.k - 1].register_forward_hook(kind)]
        try:
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                batch = pad_right(chunk, self.pad_token_id).to(device)
                with contextlib.suppress(_StopForward):  # the suffix is not needed for capturing
                    decoder_body(self.model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                h = captured.pop("h")
                dtype = self.storage_dtype or h.dtype
                self.hidden += [h[i, :len(p.input_ids)].to(dtype) for i, p in enumerate(chunk)]
        finally:
            for handle in handles:
                handle.remove()

    def stacked(self, indices: list[int], width: int, device) -> torch.Tensor:
        rows = [self.hidden[i] for i in indices]
        out = torch.zeros(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype, device=device)
        for r, h in enumerate(rows):
            out[r, :h.shape[0]] = h
        return out

    def nll(self, indices: list[int], pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`per_example_nll` of ``pairs`` (the examples at ``indices``), running only blocks ``k..``."""
        from ftedit.tokenization import pad_right

        device = next(self.model.parameters()).device
        batch = pad_right(pairs, self.pad_token_id).to(device)
        injected = _Injected(self.as_tuple)
        injected.value = self.stacked(indices, batch.input_ids.shape[1], device)
        saved = [self.blocks[i] for i in range(self.k)]
        for i in range(self.k):
            self.blocks[i] = injected
        try:
            return per_example_nll(self.model, batch)
        finally:
            for i, block in enumerate(saved):
                self.blocks[i] = block
