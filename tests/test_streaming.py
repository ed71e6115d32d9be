"""Streaming edits: replay 0 is sequential mode exactly; replay trains old edits alongside new ones."""

import copy

import pytest
import torch

from ftedit.config import resolve_config
from ftedit.data import load_requests
from ftedit.editor import edit
from ftedit.streaming import StreamConfig, StreamingEditor
from ftedit.train import Stepper


def _config(**top):
    over = {"params": {"layers": "-1", "modules": "down"}, "augment": {"n_paraphrases": 0},
            "train": {"epochs": 6, "batch_size": 4, "lr": 1e-2}, **top}
    return resolve_config("locft-bf", overrides=over)


@pytest.fixture
def requests(data_dir):
    return load_requests(data_dir / "fixtures/counterfact_rome_format_first5.json").requests


def test_stream_without_replay_is_sequential_mode(llama_model, llama_tok, requests):
    sequential = edit(copy.deepcopy(llama_model), llama_tok, requests, _config(mode="sequential", sequential_batch=2),
                      progress=False)
    stream = StreamingEditor(copy.deepcopy(llama_model), llama_tok, _config(), StreamConfig(replay_ratio=0))
    for start in range(0, len(requests), 2):
        stream.add(requests[start:start + 2])
    assert [s.train.steps for s in stream.steps] == [r.steps for r in sequential.train]
    got, expected = stream.edited_model.model.layers[2], sequential.model.model.layers[2]
    assert torch.equal(got.mlp.down_proj.weight, expected.mlp.down_proj.weight)


def test_replay_trains_a_sample_of_earlier_edits_with_each_batch(monkeypatch, llama_model, llama_tok, requests):
    original = llama_model.model.layers[2].mlp.down_proj.weight.detach().clone()
    seen: list[set[tuple]] = []
    accumulate = Stepper.accumulate

    def record(self, score, micro_batches, *args):
        seen[-1].update(score.encoded[i].chosen.input_ids for b in micro_batches for i in b)
        return accumulate(self, score, micro_batches, *args)

    monkeypatch.setattr(Stepper, "accumulate", record)
    stream = StreamingEditor(llama_model, llama_tok, _config(), StreamConfig(replay_ratio=1.0, replay_max=2))
    batches = [requests[:2], requests[2:3], requests[3:5]]
    for batch in batches:
        seen.append(set())
        step = stream.add(batch)
        assert step.new_edits == len(batch)
    assert [s.replayed_edits for s in stream.steps] == [0, 1, 2]
    assert [len(s) for s in seen] == [2, 2, 4]  # the replayed edits' examples were trained on
    assert seen[1] - seen[0] and seen[1] & seen[0]  # batch 2 trained its new edit and one edit of batch 1
    assert len(stream.requests) == 5
    restored = stream.restore()
    assert torch.equal(restored.model.layers[2].mlp.down_proj.weight, original)


def test_stream_needs_mass_mode(llama_model, llama_tok):
    with pytest.raises(ValueError, match="mode=mass"):
        StreamingEditor(llama_model, llama_tok, _config(mode="sequential"))


def test_stream_needs_fixed_layers(llama_model, llama_tok):
    with pytest.raises(ValueError, match="ftedit locate"):
        StreamingEditor(llama_model, llama_tok, _config(params={"layers": "auto"}))
