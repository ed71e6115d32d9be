"""Stopping rules and optimizer lifetime: LocFT's and EasyEdit's step-before-check, a fresh optimizer per edit,
and the edit-margin stop."""

import copy

import pytest
import torch

from ftedit.data.examples import TrainingExample
from ftedit.forward import labelled_logits, per_example_margin
from ftedit.tokenization import encode_pair, pad_right
from ftedit.train import ObjectiveConfig, TrainConfig, locality_kl, train
from test_editor import REQUESTS

PREFIX = 3  # every block of the tiny llama is frozen; the output embedding trains (it learns fastest)


def _examples(n=None):
    reqs = REQUESTS[:n] if n else REQUESTS
    return [TrainingExample(r.prompt, r.target_new, request_index=i) for i, r in enumerate(reqs)]


def _trainable(model):
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    w = model.lm_head.weight
    w.requires_grad_(True)
    return model, w


def _masked_nll(model, tok, examples):
    batch = pad_right([encode_pair(tok, e.prompt, e.target) for e in examples], tok.pad_token_id)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    labels = batch.labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = (labels != -100).float()
    return ((nll * mask).sum(1) / mask.sum(1)).mean()


def _reference_check_before(model, tok, examples, w, lr, threshold, epochs):
    """LocFT's loop as its paper's code describes it, written independently: one mini-batch of every
    example per epoch, Adam, a step only while the batch loss is >= threshold, stop once it is below."""
    opt = torch.optim.Adam([w], lr=lr)
    steps = 0
    for _ in range(epochs):
        opt.zero_grad()
        loss = _masked_nll(model, tok, examples)
        if loss.item() >= threshold:
            loss.backward()
            opt.step()
            steps += 1
        if loss.item() < threshold:
            break
    return steps


def test_threshold_checked_before_the_step_matches_locft_and_takes_one_update_less(llama_model, llama_tok):
    examples = _examples()
    ref_model, ref_w = _trainable(llama_model)
    threshold, lr = 1.0, 1e-2
    ref_steps = _reference_check_before(ref_model, llama_tok, examples, ref_w, lr, threshold, epochs=60)
    assert 1 < ref_steps < 60  # the threshold, not the epoch budget, ended it
    trained = {}
    for check in ("before", "after"):
        model, w = _trainable(llama_model)
        cfg = TrainConfig(epochs=60, batch_size=len(examples), lr=lr, optimizer="adam", loss_threshold=threshold,
                          threshold_check=check)
        result = train(model, llama_tok, examples, [w], cfg, ObjectiveConfig(), progress=False)
        trained[check] = (result, w.detach().clone())
    before, after = trained["before"][0], trained["after"][0]
    assert before.steps == ref_steps and before.skipped_steps == 1 and before.stop_reason == "loss_threshold"
    assert after.steps == ref_steps + 1 and after.skipped_steps == 0
    # float noise grows over Adam's steps (~1e-5 here); one extra update moves weights by ~lr
    assert (trained["before"][1] - ref_w.detach()).abs().max() < 1e-4
    assert (trained["after"][1] - ref_w.detach()).abs().max() > 1e-3


def _reference_fresh_adam_per_edit(model, tok, examples, w, lr, steps_per_edit):
    for ex in examples:  # EasyEdit builds its optimizer inside the per-request call
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps_per_edit):
            opt.zero_grad()
            _masked_nll(model, tok, [ex]).backward()
            opt.step()


@pytest.mark.parametrize("fresh", [True, False])
def test_depth_first_fresh_optimizer_per_edit_matches_a_new_adam_for_each_edit(llama_model, llama_tok, fresh):
    examples = _examples(3)
    ref_model, ref_w = _trainable(llama_model)
    _reference_fresh_adam_per_edit(ref_model, llama_tok, examples, ref_w, lr=1e-2, steps_per_edit=3)
    model, w = _trainable(llama_model)
    cfg = TrainConfig(pipeline="depth", steps_per_edit=3, batch_size=1, lr=1e-2, optimizer="adam",
                      fresh_optimizer_per_edit=fresh)
    train(model, llama_tok, examples, [w], cfg, ObjectiveConfig(), progress=False)
    w0 = llama_model.lm_head.weight.detach()
    # relative to the update: Adam turns float noise in near-zero gradients into lr-sized steps of single weights
    gap = ((w.detach() - ref_w.detach()).norm() / (ref_w.detach() - w0).norm()).item()
    assert (gap < 1e-3) == fresh


def test_per_example_margin_is_the_smallest_target_token_lead(llama_model, llama_tok):
    pairs = [encode_pair(llama_tok, e.prompt, e.target) for e in _examples()]
    batch = pad_right(pairs, llama_tok.pad_token_id)
    with torch.no_grad():
        got = per_example_margin(llama_model, batch)
        logits = llama_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    for b, pair in enumerate(pairs):
        leads = []
        for t in range(pair.target_start, len(pair.input_ids)):
            row, tok_id = logits[b, t - 1], pair.input_ids[t]
            others = torch.cat([row[:tok_id], row[tok_id + 1:]])
            leads.append((row[tok_id] - others.max()).item())
        assert got[b].item() == pytest.approx(min(leads), abs=1e-4)


def test_margin_stop_ends_training_once_every_edit_leads_by_the_margin(llama_model, llama_tok):
    examples = _examples()
    augmented = examples + [TrainingExample("The sky is", " blue", kind="random", request_index=0)]
    model, w = _trainable(llama_model)
    cfg = TrainConfig(epochs=200, batch_size=len(augmented), lr=1e-2, stop_margin=1.0)
    result = train(model, llama_tok, augmented, [w], cfg, ObjectiveConfig(), progress=False, prefix_layers=PREFIX)
    assert result.stop_reason == "margin" and result.epochs_run < 200
    pairs = [encode_pair(llama_tok, e.prompt, e.target) for e in examples]
    with torch.no_grad():
        margins = per_example_margin(model, pad_right(pairs, llama_tok.pad_token_id))
    assert margins.min().item() >= 1.0 and result.edit_margin == pytest.approx(margins.min().item(), abs=1e-4)
    # one epoch earlier the margin was not yet reached: the run stopped at the first epoch that reached it
    model, w = _trainable(llama_model)
    cfg = TrainConfig(epochs=result.epochs_run - 1, batch_size=len(augmented), lr=1e-2)
    train(model, llama_tok, augmented, [w], cfg, ObjectiveConfig(), progress=False, prefix_layers=PREFIX)
    with torch.no_grad():
        assert per_example_margin(model, pad_right(pairs, llama_tok.pad_token_id)).min().item() < 1.0


def test_locality_kl_over_the_whole_vocabulary_is_the_exact_kl():
    torch.manual_seed(0)
    ref = torch.randn(5, 40).log_softmax(-1)
    new = torch.randn(5, 40).log_softmax(-1)
    top = ref.topk(40, dim=-1)
    exact = (ref.exp() * (ref - new)).sum(-1)
    assert torch.allclose(locality_kl(new, top.indices, top.values), exact, atol=1e-4)
    small = ref.topk(3, dim=-1)  # coarser but still a KL: zero at the reference, positive elsewhere
    assert torch.allclose(locality_kl(ref, small.indices, small.values), torch.zeros(5), atol=1e-5)
    assert (locality_kl(new, small.indices, small.values) > 0).all()


def _pool_kl(model, ref_model, tok, pool):
    pairs = [encode_pair(tok, e.prompt, e.target) for e in pool]
    batch = pad_right(pairs, tok.pad_token_id)
    with torch.no_grad():
        new, _, _ = labelled_logits(model, batch)
        ref, _, _ = labelled_logits(ref_model, batch)
    new, ref = new.log_softmax(-1), ref.log_softmax(-1)
    return (ref.exp() * (ref - new)).sum(-1).mean().item()


def test_kl_locality_keeps_pool_prompts_closer_to_the_unedited_model_than_true_answers(llama_model, llama_tok):
    edits = _examples()
    pool = [TrainingExample(p, t, kind="random", request_index=0)
            for p, t in [("The sky is", " blue"), ("Paris is the capital of", " France"),
                         ("Water boils at", " 100 degrees"), ("The cat sat on the", " mat")]]
    kls, nll = {}, {}
    for loss in ("ce", "kl"):
        model, w = _trainable(llama_model)
        cfg = TrainConfig(epochs=30, batch_size=len(edits) + len(pool), lr=1e-2)
        train(model, llama_tok, edits + pool, [w], cfg, ObjectiveConfig(locality_loss=loss), progress=False,
              prefix_layers=PREFIX)
        kls[loss] = _pool_kl(model, llama_model, llama_tok, pool)
        nll[loss] = _masked_nll(model, llama_tok, edits).item()
    assert kls["kl"] < 0.5 * kls["ce"]
    assert nll["kl"] < 1.0  # the edits are still learned
