"""Compute precision: CPU bf16 detection, what ``auto`` resolves to, and bf16 scoring that agrees with fp32."""

from __future__ import annotations

import pytest
import torch

import tiny
from ftedit import forward, precision
from ftedit.data.requests import EditRequest, ProbePrompt
from ftedit.evaluate import evaluate_requests, scoring
from ftedit.evaluate.scoring import PairScore, near_ties, score_pairs
from ftedit.models import load_model
from ftedit.precision import (
    ENV_OVERRIDE,
    cpu_bf16_supported,
    cpu_flags,
    has_bf16_units,
    scoring_autocast,
    set_requested,
    train_autocast,
)
from ftedit.train import TrainConfig, _use_bf16
from test_eval_scoring import PAIRS


@pytest.mark.parametrize(("flags", "expected"), [("fpu sse avx2 avx512f", False), ("avx512f avx512_bf16", True),
                                                 ("amx_tile amx_bf16 amx_int8", True)])
def test_cpu_flags_decide_bf16_support(tmp_path, flags, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == frozenset(flags.split())
    assert has_bf16_units(cpu_flags(info)) is expected
    assert cpu_flags(tmp_path / "absent") == frozenset()


@pytest.mark.parametrize("detected", [False, True])
def test_env_override_wins_over_detection(monkeypatch, detected):
    monkeypatch.setattr(precision, "_detected", lambda: detected)
    monkeypatch.delenv(ENV_OVERRIDE)
    assert cpu_bf16_supported() is detected
    monkeypatch.setenv(ENV_OVERRIDE, "1")
    assert cpu_bf16_supported()
    monkeypatch.setenv(ENV_OVERRIDE, "0")
    assert not cpu_bf16_supported()


@pytest.mark.parametrize("bf16_cpu", [False, True])
def test_auto_resolves_by_hardware_and_explicit_fp32_keeps_the_exact_path(monkeypatch, llama_model, bf16_cpu):
    monkeypatch.setenv(ENV_OVERRIDE, "1" if bf16_cpu else "0")
    auto = TrainConfig(mixed_precision="auto")
    assert scoring_autocast(llama_model) is bf16_cpu and train_autocast(llama_model) is bf16_cpu
    assert _use_bf16(auto, llama_model) is bf16_cpu
    assert not _use_bf16(TrainConfig(mixed_precision="no"), llama_model)
    set_requested(llama_model, "fp32")
    assert not scoring_autocast(llama_model) and not _use_bf16(auto, llama_model)
    assert _use_bf16(TrainConfig(mixed_precision="bf16"), llama_model)


def test_bf16_weights_train_with_autocast_but_are_not_rescored(monkeypatch, llama_model):
    monkeypatch.setenv(ENV_OVERRIDE, "0")
    llama_model.to(torch.bfloat16)
    set_requested(llama_model, "bf16")
    assert train_autocast(llama_model) and not scoring_autocast(llama_model)


@pytest.mark.parametrize(("dtype", "expected"), [("auto", True), ("fp32", False), (None, True)])
def test_loader_records_the_requested_dtype(monkeypatch, llama_dir, dtype, expected):
    monkeypatch.setenv(ENV_OVERRIDE, "1")
    model, _, identity = load_model(str(llama_dir), device="cpu", dtype=dtype)
    assert next(model.parameters()).dtype == torch.float32
    assert scoring_autocast(model) is expected and train_autocast(model) is expected
    assert ("compute" in identity.extra) is expected


def test_split_verifies_inside_an_autocast_region(llama_tok):
    model = tiny.tiny_gemma3(llama_tok)
    forward._PARTS.pop(model, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert forward.lm_parts(model).body is not None


def test_near_ties_are_small_argmax_margins_and_close_comparisons():
    scores = [PairScore((1,), (-1.0,), (1,)), PairScore((2,), (-1.05,), (1,)), PairScore((3,), (-3.0,), (1,)),
              PairScore((4,), (-0.5,), (4,))]
    assert near_ties(scores, [1.0, 1.0, 1.0, 1.0], [(0, 1)], threshold=0.1) == [0, 1]
    assert near_ties(scores, [1.0, 1.0, 1.0, 1.0], [(0, 2)], threshold=0.1) == []
    assert near_ties(scores, [1.0, 1.0, 0.01, 1.0], [], threshold=0.1) == [2]


def _fp32_and_bf16(monkeypatch, model, tok, threshold):
    monkeypatch.setattr(scoring, "NEAR_TIE", threshold)
    monkeypatch.setenv(ENV_OVERRIDE, "0")
    exact = score_pairs(model, tok, PAIRS)
    monkeypatch.setenv(ENV_OVERRIDE, "1")
    stats: dict = {}
    mixed = score_pairs(model, tok, PAIRS, compare=[(0, 1)], stats=stats)
    return exact, mixed, stats


def test_bf16_scoring_runs_in_bf16_and_rescored_pairs_are_exactly_fp32(monkeypatch, llama_model, llama_tok):
    exact, mixed, stats = _fp32_and_bf16(monkeypatch, llama_model, llama_tok, 0.0)
    assert stats == {"bf16": True, "pairs": 5, "rescored": 0}
    assert any(a.logprobs != b.logprobs for a, b in zip(exact, mixed))
    assert all(a.logprobs == pytest.approx(b.logprobs, abs=0.1) for a, b in zip(exact, mixed))
    exact, mixed, stats = _fp32_and_bf16(monkeypatch, llama_model, llama_tok, float("inf"))
    assert stats["rescored"] == 5 and mixed == exact


SUBJECTS = ["Danielle Darrieux", "Paris", "the Eiffel Tower", "Tokyo", "Angela Merkel", "the Nile", "Toyota", "Apple"]
TARGETS = ["Rome", "Berlin", "French", "English", "Microsoft", "Japan", "piano", "London"]


def _request(i: int) -> EditRequest:
    s, new, true = SUBJECTS[i % 8], TARGETS[i % 8], TARGETS[(3 * i + 1) % 8]
    return EditRequest(prompt=f"The home of {s} is", subject=s, target_new=new, target_true=true,
                       paraphrase_prompts=(f"Where is {s}? It is in", f"{s} is located in"),
                       neighborhood=tuple(ProbePrompt(f"The home of {t} is", true) for t in SUBJECTS if t != s)[:4])


RATES = ("efficacy", "generalization", "locality", "efficacy_acc", "generalization_acc", "locality_acc")


def _rates(monkeypatch, model, tok, requests, flag: str) -> dict:
    monkeypatch.setenv(ENV_OVERRIDE, flag)
    result = evaluate_requests(model, tok, requests, progress=False)
    return {k: result.summary[k] for k in RATES} | {"scoring": result.config["scoring"]}


def test_counterfact_rates_agree_with_fp32_only_thanks_to_the_rescoring(monkeypatch, llama_model, llama_tok):
    """On a random model many decisions are close: plain bf16 flips one here, the near-tie re-scoring does not."""
    requests = [_request(i) for i in range(16)]
    exact = _rates(monkeypatch, llama_model, llama_tok, requests, "0")
    mixed = _rates(monkeypatch, llama_model, llama_tok, requests, "1")
    assert mixed.pop("scoring").startswith("bf16") and exact.pop("scoring") == "float32"
    assert mixed == exact
    monkeypatch.setattr(scoring, "NEAR_TIE", 0.0)
    plain_bf16 = _rates(monkeypatch, llama_model, llama_tok, requests, "1")
    assert {k: v for k, v in plain_bf16.items() if k != "scoring"} != exact


def test_cast_once_region_scores_as_plain_autocast_and_restores_frozen_flags(monkeypatch, llama_model, llama_tok):
    from ftedit.precision import autocast, scoring_context
    from ftedit.tokenization import encode_pair

    encoded = [encode_pair(llama_tok, p, t) for p, t in PAIRS[:5]]
    parts = forward.lm_parts(llama_model)
    llama_model.lm_head.weight.requires_grad_(True)  # a trainable weight stays trainable
    flags = [p.requires_grad for p in llama_model.parameters()]
    with torch.no_grad(), autocast(torch.device("cpu"), True):
        plain = scoring._score_distinct(llama_model, parts, encoded, llama_tok.pad_token_id, 2, False, "", True)
    with torch.no_grad(), scoring_context(llama_model, True):
        assert all(p.requires_grad for p in llama_model.parameters())
        cached = scoring._score_distinct(llama_model, parts, encoded, llama_tok.pad_token_id, 2, False, "", True)
    assert cached == plain
    assert [p.requires_grad for p in llama_model.parameters()] == flags
