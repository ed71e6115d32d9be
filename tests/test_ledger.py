"""The edit ledger: written with the model, carried forward on re-editing, listed, checked for contradictions."""

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from ftedit.commands import app
from ftedit.data import load_requests
from ftedit.data.requests import EditRequest, request_hash
from ftedit.ledger import (
    ContradictionError,
    check_conflicts,
    find_conflicts,
    history_digest,
    new_entries,
    read_ledger,
)

FIXTURE = "fixtures/counterfact_rome_format_first5.json"


def _edit(model_dir, data, out, *extra):
    args = ["edit", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--recipe", "locft-bf",
            "--no-eval", "--no-progress", "--set", "train.epochs=1", "--set", "params.layers=-1", *extra]
    return CliRunner().invoke(app, args)


def test_reediting_carries_the_history_forward_and_appends(tmp_path, llama_dir, data_dir):
    requests = load_requests(data_dir / FIXTURE).requests
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    records = json.loads((data_dir / FIXTURE).read_text())
    first.write_text(json.dumps(records[:3]))
    second.write_text(json.dumps(records[3:]))

    assert _edit(llama_dir, first, tmp_path / "e1").exit_code == 0
    result = _edit(tmp_path / "e1" / "model", second, tmp_path / "e2")
    assert result.exit_code == 0, result.output

    one, two = read_ledger(tmp_path / "e1"), read_ledger(tmp_path / "e2" / "model")
    assert [e.hash for e in one] == [request_hash(r) for r in requests[:3]]
    assert [e.hash for e in two] == [request_hash(r) for r in requests]
    assert two[:3] == one  # earlier lines copied unchanged
    assert (tmp_path / "e1" / "ledger.jsonl").read_text() in (tmp_path / "e2" / "ledger.jsonl").read_text()
    assert two[3].parent["name_or_path"].endswith("e1/model") and two[0].parent["name_or_path"] == str(llama_dir)
    assert len({e.run for e in two}) == 2 and two[0].recipe == "locft-bf" and two[0].method == "full"
    assert two[0].previous == "" and two[3].previous == history_digest(one)

    table = CliRunner().invoke(app, ["ledger", str(tmp_path / "e2")])
    assert table.exit_code == 0 and "5 edits" in table.output
    listed = CliRunner().invoke(app, ["ledger", str(tmp_path / "e2"), "--json"])
    assert [json.loads(line)["hash"] for line in listed.output.splitlines()] == [e.hash for e in two]


def test_a_contradicting_edit_warns_or_stops_per_flag(tmp_path, llama_dir, data_dir, caplog):
    record = json.loads((data_dir / FIXTURE).read_text())[0]
    first = tmp_path / "first.json"
    first.write_text(json.dumps([record]))
    assert _edit(llama_dir, first, tmp_path / "e1").exit_code == 0

    record["requested_rewrite"]["target_new"]["str"] = "Klingon"
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps([record]))
    stopped = _edit(tmp_path / "e1" / "model", changed, tmp_path / "e2", "--on-conflict", "error")
    assert isinstance(stopped.exception, ContradictionError) and "Klingon" in str(stopped.exception)
    assert not (tmp_path / "e2").exists()
    warned = _edit(tmp_path / "e1" / "model", changed, tmp_path / "e2")
    assert warned.exit_code == 0 and "contradict" in caplog.text
    assert [e.target_new for e in read_ledger(tmp_path / "e2")][-1] == "Klingon"


def _req(prompt, subject, target, relation=None):
    return EditRequest(prompt, subject, target, relation_id=relation)


def test_conflicts_by_prompt_by_relation_and_within_a_batch():
    earlier = new_entries([_req("The capital of France is", "France", "Lyon", "P36")], method="full",
                          recipe="x", config={}, parent={})
    same = _req("The capital of France is", "France", "Lyon", "P36")
    other_prompt_same_relation = _req("France's capital city is", "France", "Nice", "P36")
    other_subject = _req("The capital of Spain is", "Spain", "Nice", "P36")
    assert find_conflicts(earlier, [same, other_subject]) == []
    (hit,) = find_conflicts(earlier, [other_prompt_same_relation])
    assert hit.earlier_target == "Lyon" and hit.earlier_run == earlier[0].run
    no_relation = [_req("The capital of France is", "France", "Brest")]
    assert len(find_conflicts(earlier, no_relation)) == 1
    batch = [_req("X plays", "X", "piano"), _req("X plays", "X", "violin")]
    (inner,) = find_conflicts([], batch)
    assert inner.earlier_run == "" and inner.new.target_new == "violin"
    # the latest edit of a fact is what the model holds
    later = new_entries([replace(same, target_new="Nice")], method="full", recipe="x", config={}, parent={})
    assert find_conflicts(earlier + later, [other_prompt_same_relation]) == []
    with pytest.raises(ContradictionError):
        check_conflicts(earlier, no_relation, "error")
    assert check_conflicts(earlier, no_relation, "ignore") == []
