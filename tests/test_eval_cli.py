"""The ``ftedit eval`` command function, end to end on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest

from ftedit.commands.eval import eval_command
from ftedit.evaluate import evaluate_requests
from ftedit.outputs import write_json_atomic


def run(llama_dir, data, tmp_path, **kwargs):
    out = tmp_path / "results" / "eval.json"
    payload = eval_command(model=str(llama_dir), data=str(data), out=out, progress=False, device="cpu",
                           dtype="fp32", **kwargs)
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload, default=str))
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temp file left behind
    return payload


def test_counterfact_with_base_fluency_consistency_and_perplexity(llama_dir, data_dir, tmp_path, capsys):
    data = data_dir / "fixtures" / "counterfact_rome_format_first5.json"
    snippets = [{"relation_id": "P103", "target_id": "Q1860", "samples": [{"name": "x", "text": "English is spoken."}]}]
    (tmp_path / "snips.json").write_text(json.dumps(snippets))
    payload = run(llama_dir, data, tmp_path, n=3, base_model=str(llama_dir), details=True, fluency=True,
                  gen_max_len=20, snippets=tmp_path / "snips.json",
                  ppl_data=data_dir / "downstream" / "wiki_summaries.jsonl", ppl_n=2, ppl_max_length=32)
    summary = payload["result"]["summary"]
    for key in ("efficacy", "generalization", "locality", "edit_score", "efficacy_magnitude", "fluency",
                "perplexity"):
        assert isinstance(summary[key], float), key
    assert summary["protocol"] == "counterfact" and summary["n_records"] == 3
    assert summary["n_records_consistency"] == 1  # case 0 (P103 -> Q1860); the others have no snippets
    assert isinstance(payload["result"]["records"][0]["generation"]["consistency"], float)
    assert payload["model"]["source"] == "local" and payload["model"]["model_class"] == "LlamaForCausalLM"
    assert all(d["delta"] == 0 for d in payload["compare"].values())
    assert payload["config"]["n"] == 3 and payload["config"]["fluency"] is True
    assert "efficacy" in capsys.readouterr().out


def test_metrics_equal_the_library_call(llama_dir, data_dir, tmp_path, llama_tok):
    from ftedit.data.loaders import load_requests
    from ftedit.models import load_model

    data = data_dir / "counterfact" / "easyedit" / "counterfact-edit.json"
    payload = run(llama_dir, data, tmp_path, n=4, offset=2)
    model, tok, _ = load_model(str(llama_dir), device="cpu", dtype="fp32")
    direct = evaluate_requests(model, tok, load_requests(data, n=4, offset=2).requests, progress=False).summary
    for key in ("efficacy", "generalization", "locality", "edit_score", "locality_magnitude"):
        assert payload["result"]["summary"][key] == pytest.approx(direct[key]), key
    assert "records" not in payload["result"]


def test_zsre_protocol_auto(llama_dir, data_dir, tmp_path):
    payload = run(llama_dir, data_dir / "fixtures" / "zsre_mend_eval_first5.json", tmp_path)
    assert payload["result"]["protocol"] == "zsre"
    assert payload["result"]["summary"]["n_neighborhood_prompts"] == 5


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"a": float("nan"), "b": object.__new__(_Boom)})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


class _Boom:
    def __str__(self) -> str:
        raise ValueError("cannot serialize")
