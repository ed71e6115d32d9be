"""Training options: length grouping keeps epochs breadth-first with less padding; gradient checkpointing is exact."""

import copy
import random

import pytest
import torch

from ftedit.data.examples import TrainingExample
from ftedit.editor import edit
from ftedit.evaluate import evaluate_requests
from ftedit.train import ObjectiveConfig, TrainConfig, _epoch_plan, train
from test_editor import REQUESTS, _config


def _padding(plan, lengths) -> int:
    return sum(max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch)
               for step in plan for batch in step)


def test_length_grouped_epochs_cover_every_example_once_with_less_padding():
    lengths = [random.Random(i).randint(5, 40) for i in range(300)]
    grouped_cfg = TrainConfig(batch_size=8, grad_accum=2, group_by_length=True)
    plain_cfg = TrainConfig(batch_size=8, grad_accum=2)
    grouped = [_epoch_plan(random.Random(0), lengths, grouped_cfg) for _ in range(2)]
    plain = _epoch_plan(random.Random(0), lengths, plain_cfg)
    for plan in (grouped[0], plain):
        flat = [i for step in plan for batch in step for i in batch]
        assert sorted(flat) == list(range(len(lengths)))
        assert all(len(step) <= 2 and all(len(b) <= 8 for b in step) for step in plan)
    assert grouped[0] == grouped[1]  # same seed, same plan (resume relies on it)
    assert _padding(grouped[0], lengths) < 0.5 * _padding(plain, lengths)
    # batch order is shuffled: lengths do not run from long to short through the epoch
    first_lengths = [max(lengths[i] for i in step[0]) for step in grouped[0]]
    assert first_lengths != sorted(first_lengths, reverse=True)


def test_length_grouped_training_still_writes_the_edits(llama_model, llama_tok):
    result = edit(llama_model, llama_tok, REQUESTS, _config(train={"group_by_length": True, "batch_size": 2}),
                  progress=False)
    assert evaluate_requests(result.model, llama_tok, REQUESTS, progress=False).summary["efficacy"] == 100.0


@pytest.mark.parametrize("prefix_layers", [0, 1])
def test_gradient_checkpointing_recomputes_and_gives_the_same_weights(llama_model, llama_tok, prefix_layers):
    examples = [TrainingExample(r.prompt, r.target_new, request_index=i) for i, r in enumerate(REQUESTS)]
    weights, calls = {}, {}
    for checkpointing in (False, True):
        model = copy.deepcopy(llama_model)
        for p in model.parameters():
            p.requires_grad_(False)
        params = [model.model.layers[i].mlp.down_proj.weight for i in (1, 2)]
        for p in params:
            p.requires_grad_(True)
        count = []
        # a pre-hook: the recompute stops early, once the tensors backward needs exist (before the MLP returns)
        model.model.layers[2].mlp.register_forward_pre_hook(lambda *_, count=count: count.append(1))
        cfg = TrainConfig(epochs=2, batch_size=2, lr=1e-2, gradient_checkpointing=checkpointing)
        steps = train(model, llama_tok, examples, params, cfg, ObjectiveConfig(), progress=False,
                      prefix_layers=prefix_layers).steps
        weights[checkpointing] = [p.detach().clone() for p in params]
        calls[checkpointing] = len(count)
        assert not any(block.training for block in model.model.layers)
        assert not model.model.gradient_checkpointing
    assert calls[True] == calls[False] + steps  # the block ran again in every backward pass
    for a, b in zip(weights[True], weights[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _trainable_copy(model, layers=(-2, -1), dtype=None):
    model = copy.deepcopy(model)
    if dtype is not None:
        model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for i in layers for p in model.model.layers[i].mlp.parameters()]
    for p in params:
        p.requires_grad_(True)
    return model, params


def _mean_nll(model, tok, examples) -> float:
    from ftedit.forward import per_example_nll
    from ftedit.tokenization import encode_pair, pad_right

    batch = pad_right([encode_pair(tok, e.prompt, e.target) for e in examples], tok.pad_token_id)
    with torch.no_grad():
        return per_example_nll(model, batch)[0].float().mean().item()


@pytest.mark.parametrize("prefix_layers", [0, 1])
def test_bf16_autocast_training_learns_with_the_updated_weights(llama_model, llama_tok, prefix_layers):
    """Under autocast every step must run on the current weights (autocast's cast cache would keep the first
    step's bf16 copy of each trainable weight), and the loss must fall as it does in fp32."""
    examples = [TrainingExample(r.prompt, r.target_new, request_index=i) for i, r in enumerate(REQUESTS)]
    histories = {}
    for precision in ("no", "bf16"):
        model, params = _trainable_copy(llama_model)
        start = _mean_nll(model, llama_tok, examples)
        cfg = TrainConfig(epochs=40, batch_size=3, lr=1e-2, mixed_precision=precision)
        result = train(model, llama_tok, examples, params, cfg, ObjectiveConfig(), progress=False,
                       prefix_layers=prefix_layers)
        histories[precision] = result.loss_history
        assert result.loss_history[-1] < start - 0.4
        # the trained weights, scored in fp32 without autocast, agree with what training saw
        assert abs(_mean_nll(model, llama_tok, examples) - result.loss_history[-1]) < 0.1
        assert all(p.dtype == torch.float32 for p in params)
    assert abs(histories["bf16"][-1] - histories["no"][-1]) < 0.05


def test_bf16_model_trains_fp32_master_weights_and_returns_its_dtype(llama_model, llama_tok):
    """A model loaded in bf16 (CUDA's default) is trained on fp32 copies of its trainable weights, so that small
    updates are not rounded away, and gets its weights back in bf16."""
    examples = [TrainingExample(r.prompt, r.target_new, request_index=i) for i, r in enumerate(REQUESTS)]
    model, params = _trainable_copy(llama_model, dtype=torch.bfloat16)
    before = [p.detach().clone() for p in params]
    start = _mean_nll(model, llama_tok, examples)
    cfg = TrainConfig(epochs=40, batch_size=3, lr=1e-2, mixed_precision="bf16")
    result = train(model, llama_tok, examples, params, cfg, ObjectiveConfig(), progress=False)
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    assert result.loss_history[-1] < start - 0.4
    assert abs(_mean_nll(model, llama_tok, examples) - result.loss_history[-1]) < 0.1
