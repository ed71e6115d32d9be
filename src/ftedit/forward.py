"""Forward passes that apply the LM head only where a loss or metric needs it.

With a 262k-token vocabulary (Gemma 3) the LM head costs more than the rest of a small model; evaluating it
only at the positions that predict target tokens is the single largest saving in training and scoring.
"""

from __future__ import annotations

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
