"""Edit-request loaders: every input schema, record selection, validation errors and skipping."""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from pathlib import Path

import pytest

from ftedit.data import (
    EditRequest,
    PoolFact,
    ProbePrompt,
    RequestFileNotFoundError,
    RequestValidationError,
    detect_format,
    find_conflicts,
    load_pool_facts,
    load_requests,
)
from ftedit.errors import InputError

ROME_FIXTURE = "fixtures/counterfact_rome_format_first5.json"
ZSRE_FIXTURE = "fixtures/zsre_mend_eval_first5.json"
EASYEDIT_EDIT = "counterfact/easyedit/counterfact-edit.json"
FULL_UNION = "counterfact/full/counterfact_full_union.json"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def assert_names(err: pytest.ExceptionInfo, path: Path, index: int | None, field: str | None) -> str:
    msg = str(err.value)
    assert path.name in msg
    if index is not None:
        assert re.search(rf"record {index}\b", msg), msg
    if field is not None:
        assert f"'{field}'" in msg, msg
    return msg


def fact(prompt="The capital of France is", target="Paris", **extra) -> dict:
    return {"prompt": prompt, "target": target, **extra}


def rome_record(**rw) -> dict:
    base = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}}
    return {"case_id": 0, "requested_rewrite": {**base, **rw}, "neighborhood_prompts": ["Léon Blum speaks"]}


# ---------------------------------------------------------------------------------------------- formats


def test_rome_fixture(data_dir):
    res = load_requests(data_dir / ROME_FIXTURE)
    assert len(res.requests) == 5 and res.skipped == []
    r = res.requests[0]
    assert r.prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.subject, r.target_new, r.target_true) == ("Danielle Darrieux", "English", "French")
    assert (r.case_id, r.relation_id) == (0, "P103")
    assert len(r.paraphrase_prompts) == 2 and len(r.generation_prompts) == 10
    assert r.neighborhood[0] == ProbePrompt("The mother tongue of Léon Blum is", "French")
    assert len(r.neighborhood) == 10 and {n.target for n in r.neighborhood} == {"French"}
    assert [q.origin.index for q in res.requests] == [0, 1, 2, 3, 4]
    assert res.requests[4].origin.file == str(data_dir / ROME_FIXTURE)


def test_easyedit_edit_file(data_dir):
    r = load_requests(data_dir / EASYEDIT_EDIT, n=2).requests[1]
    raw = json.loads((data_dir / EASYEDIT_EDIT).read_text())[1]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        raw["prompt"], raw["subject"], raw["target_new"], raw["ground_truth"])
    assert r.paraphrase_prompts == (raw["rephrase_prompt"],)
    assert r.neighborhood == (ProbePrompt(raw["locality_prompt"], raw["locality_ground_truth"]),)
    assert r.case_id == raw["case_id"] and r.origin.index == 1


def test_zsre_fixture_mirrors_memit(data_dir):
    res = load_requests(data_dir / ZSRE_FIXTURE)
    raw = json.loads((data_dir / ZSRE_FIXTURE).read_text())
    assert len(res.requests) == 5
    r = res.requests[3]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        raw[3]["src"], raw[3]["subject"], raw[3]["answers"][0], None)
    assert r.paraphrase_prompts == (raw[3]["rephrase"],)
    # MEMIT's MENDQADataset: neighborhood prompt is loc + "?", case_id is the record's position.
    assert r.neighborhood == (ProbePrompt(raw[3]["loc"] + "?", raw[3]["loc_ans"]),)
    assert r.case_id == 3


def test_user_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [
        fact(subject="France", target_true="Lyon", paraphrases=["France's capital is"]),
        {"prompt": "Water boils at", "target_new": "100 degrees"},
    ])
    a, b = load_requests(path).requests
    assert a == EditRequest("The capital of France is", "France", "Paris", "Lyon", ("France's capital is",))
    assert (b.prompt, b.subject, b.target_new, b.target_true) == ("Water boils at", "", "100 degrees", None)
    assert b.origin.file == str(path) and b.origin.index == 1


def test_user_csv(tmp_path):
    path = write_csv(tmp_path / "facts.csv", ["prompt", "target", "subject", "paraphrases"], [
        ["The capital of France is", "Paris", "France", '["France has its capital in", "The French capital is"]'],
        ["Water boils at", "100 degrees", "", "Boiling water is at\nWater starts boiling at"],
        ["The sky is", "blue", "", ""],
    ])
    a, b, c = load_requests(path).requests
    assert a.subject == "France" and a.paraphrase_prompts == ("France has its capital in", "The French capital is")
    assert b.subject == "" and b.paraphrase_prompts == ("Boiling water is at", "Water starts boiling at")
    assert (c.target_new, c.paraphrase_prompts, c.origin.index) == ("blue", (), 2)


def test_to_dict_rows_load_back(data_dir, tmp_path):
    reqs = load_requests(data_dir / ROME_FIXTURE).requests
    path = write_jsonl(tmp_path / "dump.jsonl", [r.to_dict() for r in reqs])
    assert load_requests(path).requests == reqs


@pytest.mark.parametrize("name,text,format", [
    ("facts.json", json.dumps(fact()) + "\n" + json.dumps({**fact(), "case_id": 1}) + "\n", "jsonl"),
    ("facts.json", "prompt,target\nThe capital of France is,Paris\n", "csv"),
    ("facts.data", "prompt,target\nThe capital of France is,Paris\n", "auto"),
    ("facts.data", json.dumps(fact()) + "\n", "auto"),
])
def test_parser_forced_or_sniffed(tmp_path, name, text, format):
    path = tmp_path / name
    path.write_text(text)
    reqs = load_requests(path, format=format).requests
    assert {(r.prompt, r.target_new) for r in reqs} == {("The capital of France is", "Paris")}


def test_forced_schema(data_dir, tmp_path):
    path = write_json(tmp_path / "zsre.json", json.loads((data_dir / ZSRE_FIXTURE).read_text()))
    assert len(load_requests(path, format="zsre").requests) == 5
    with pytest.raises(RequestValidationError) as err:
        load_requests(path, format="counterfact")
    assert_names(err, path, 0, "requested_rewrite")


def test_unknown_format_or_conflicts_mode_rejected(data_dir):
    with pytest.raises(ValueError, match="unknown format"):
        load_requests(data_dir / ROME_FIXTURE, format="rome")
    with pytest.raises(ValueError, match="unknown conflicts mode"):
        load_requests(data_dir / ROME_FIXTURE, conflicts="skip")


@pytest.mark.parametrize("record,expected", [
    ({"requested_rewrite": {}}, "counterfact"),
    ({"src": "q", "answers": ["a"], "loc": "nq question: x"}, "zsre"),
    ({"prompt": "p", "target_new": "t", "ground_truth": "g"}, "counterfact-easyedit"),
    ({"prompt": "p", "target_new": "t", "subject": "s"}, "jsonl"),
    ({"prompt": "p", "target": "t"}, "jsonl"),
])
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_hub_dataset_rows(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([fact(), fact("Water boils at", "100 degrees"), fact("The sky is", "blue")])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    res = load_requests("hf:someone/facts", split="test", offset=1, n=1)
    assert calls == [("someone/facts", "test")]
    assert [(r.prompt, r.origin.index) for r in res.requests] == [("Water boils at", 1)]
    assert res.requests[0].origin.file == "hf:someone/facts[test]"


# ---------------------------------------------------------------------------------------------- n / offset


def test_n_and_offset_keep_file_indices(data_dir):
    reqs = load_requests(data_dir / ROME_FIXTURE, n=2, offset=1).requests
    assert [r.origin.index for r in reqs] == [1, 2] and [r.case_id for r in reqs] == [1, 2]
    assert load_requests(data_dir / ROME_FIXTURE, offset=4).requests[0].case_id == 4
    with pytest.raises(RequestValidationError, match="holds no edit requests from record 9 on"):
        load_requests(data_dir / ROME_FIXTURE, offset=9)
    with pytest.raises(InputError, match="n must be at least 1"):
        load_requests(data_dir / ROME_FIXTURE, n=0)


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_n_and_offset_select_before_validation(tmp_path, suffix):
    prompts = ["", "A is", "B is", "C is", ""]  # records 0 and 4 are invalid but outside the window
    if suffix == "jsonl":
        path = tmp_path / "f.jsonl"
        path.write_text("\n".join(json.dumps(fact(p, "x")) for p in prompts) + "\n{broken\n")
    else:
        path = write_csv(tmp_path / "f.csv", ["prompt", "target"], [[p, "x"] for p in prompts])
    res = load_requests(path, offset=1, n=3)
    assert [(r.prompt, r.origin.index) for r in res.requests] == [("A is", 1), ("B is", 2), ("C is", 3)]


def test_negative_n_or_offset_rejected(data_dir):
    with pytest.raises(ValueError):
        load_requests(data_dir / ROME_FIXTURE, offset=-1)
    with pytest.raises(ValueError):
        load_requests(data_dir / ROME_FIXTURE, n=-1)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad,field", [
    (fact(prompt=""), "prompt"),
    (fact(prompt="   "), "prompt"),
    (fact(target=""), "target"),
    (fact(target=" \t"), "target"),
    (fact(target=42), "target"),
    (fact(target=["Paris", "Lyon"]), "target"),
    ({"prompt": "The capital of France is"}, "target"),
    ({"target": "Paris"}, "prompt"),
    (fact(subject="Germany"), "subject"),
    (fact(subject="france"), "subject"),  # case-sensitive
    (fact(paraphrases=["ok", ""]), "paraphrases[1]"),
    (fact(target="Paris", target_new="Lyon"), "target"),
])
def test_user_record_errors(tmp_path, bad, field):
    path = write_jsonl(tmp_path / "facts.jsonl", [fact("A is", "x"), fact("B is", "y"), bad])
    with pytest.raises(RequestValidationError) as err:
        load_requests(path)
    assert_names(err, path, 2, field)
    assert err.value.issue.index == 2 and err.value.issue.field == field


def test_non_string_target_message_names_type(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [fact(target=42)])
    with pytest.raises(RequestValidationError, match="must be a string, got int"):
        load_requests(path)


@pytest.mark.parametrize("rw,field", [
    ({"target_new": {"str": 5}}, "requested_rewrite.target_new.str"),
    ({"target_new": {"id": "Q1"}}, "requested_rewrite.target_new.str"),
    ({"target_new": {"str": "  "}}, "requested_rewrite.target_new.str"),
    ({"prompt": ""}, "requested_rewrite.prompt"),
    ({"subject": None}, "requested_rewrite.subject"),
    ({"prompt": "The mother tongue of Bob is"}, "requested_rewrite.prompt"),  # no "{}" slot for the subject
    ({"prompt": "The mother tongue of Danielle Darrieux is"}, "requested_rewrite.prompt"),  # subject, but no "{}"
    ({"target_new": {"str": "French"}}, "requested_rewrite.target_new"),  # new == true: a no-op edit
    ({"target_new": {"str": "Eng\nlish"}}, "requested_rewrite.target_new.str"),
    ({"target_true": None}, "requested_rewrite.target_true"),  # neighbors need it
])
def test_rome_record_errors(tmp_path, rw, field):
    path = write_json(tmp_path / "cf.json", [rome_record(), rome_record(**rw)])
    with pytest.raises(RequestValidationError) as err:
        load_requests(path)
    assert_names(err, path, 1, field)


def test_rome_subject_checked_after_filling(tmp_path):
    path = write_json(tmp_path / "cf.json", [rome_record(prompt="{} speaks")])
    assert load_requests(path).requests[0].prompt == "Danielle Darrieux speaks"


@pytest.mark.parametrize("drop,field", [("answers", "answers"), ("src", "src"), ("loc_ans", "loc_ans")])
def test_zsre_missing_field(data_dir, tmp_path, drop, field):
    rows = json.loads((data_dir / ZSRE_FIXTURE).read_text())
    del rows[3][drop]
    path = write_json(tmp_path / "zsre.json", rows)
    with pytest.raises(RequestValidationError) as err:
        load_requests(path)
    assert_names(err, path, 3, field)
    assert "missing required field" in str(err.value)


def test_zsre_empty_answers(data_dir, tmp_path):
    rows = json.loads((data_dir / ZSRE_FIXTURE).read_text())
    rows[2]["answers"] = []
    path = write_json(tmp_path / "zsre.json", rows)
    with pytest.raises(RequestValidationError) as err:
        load_requests(path)
    assert_names(err, path, 2, "answers")


def test_easyedit_subject_not_in_prompt(data_dir, tmp_path):
    rows = json.loads((data_dir / EASYEDIT_EDIT).read_text())[:4]
    rows[3]["subject"] = rows[3]["subject"].upper()
    path = write_json(tmp_path / "cf-edit.json", rows)
    with pytest.raises(RequestValidationError) as err:
        load_requests(path)
    assert_names(err, path, 3, "subject")


def test_conflicting_targets_name_both_records(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [fact("A is", "x"), fact(), fact("B is", "y"), fact(target="Lyon")])
    with pytest.raises(RequestValidationError) as err:
        load_requests(path)
    msg = assert_names(err, path, 3, "target")
    assert re.search(r"record 1\b", msg) and "'Paris'" in msg and "'Lyon'" in msg


def test_exact_duplicate_is_invalid_and_skippable(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [fact(), fact()])
    with pytest.raises(RequestValidationError, match="record 1, line 2: exact duplicate of record 0") as err:
        load_requests(path)
    assert "--skip-invalid" in err.value.hint
    res = load_requests(path, skip_invalid=True)
    assert [r.origin.index for r in res.requests] == [0] and [s.index for s in res.skipped] == [1]


def test_same_prompt_and_target_in_different_records_is_fine(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [fact(), {**fact(), "case_id": 7}])
    assert len(load_requests(path).requests) == 2


def test_benchmark_conflicts_warn_by_default_error_on_request(tmp_path, caplog):
    path = write_json(tmp_path / "cf.json", [rome_record(), rome_record(target_new={"str": "German"})])
    with caplog.at_level(logging.WARNING, logger="ftedit.data.loaders"):
        assert len(load_requests(path).requests) == 2
    assert "record 0" in caplog.text and "record 1" in caplog.text
    with pytest.raises(RequestValidationError) as err:
        load_requests(path, conflicts="error")
    assert_names(err, path, 1, "requested_rewrite.target_new")


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(fact("A is", "x")) + "\n\n" + '{"prompt": "B is", "target": }\n')
    with pytest.raises(RequestValidationError) as err:
        load_requests(path)
    msg = assert_names(err, path, 1, None)
    assert "line 3" in msg and "malformed JSON" in msg


@pytest.mark.parametrize("data,kind", [({"records": [fact()]}, "dict"), ("facts", "str"), (3, "int")])
def test_top_level_json_not_a_list(tmp_path, data, kind):
    path = write_json(tmp_path / "facts.json", data)
    with pytest.raises(RequestValidationError, match=f"list of objects, got {kind}") as err:
        load_requests(path)
    assert_names(err, path, None, None)


def test_json_list_with_non_object(tmp_path):
    path = write_json(tmp_path / "facts.json", [fact(), ["The sky is", "blue"]])
    with pytest.raises(RequestValidationError, match="must be an object, got list") as err:
        load_requests(path)
    assert_names(err, path, 1, None)


def test_invalid_json_file(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(fact()) + "\n" + json.dumps(fact()) + "\n")
    with pytest.raises(RequestValidationError, match="not valid JSON: Extra data") as err:
        load_requests(path)
    assert_names(err, path, None, None)
    assert "format='jsonl'" in err.value.hint


def test_csv_row_with_extra_cells(tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text("prompt,target\nA is,x\nB is,y,z\n")
    with pytest.raises(RequestValidationError, match="more cells than the header") as err:
        load_requests(path)
    assert "line 3" in assert_names(err, path, 1, None)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(RequestFileNotFoundError) as err:
        load_requests(path)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    assert_names(err, path, None, None)


def test_error_counts_the_other_invalid_records(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [fact(prompt=""), fact(target=""), fact(target=1)])
    with pytest.raises(RequestValidationError, match="and 2 more invalid records"):
        load_requests(path)


# ---------------------------------------------------------------------------------------------- skip_invalid


def test_skip_invalid_reports_exactly_what_was_skipped(tmp_path, caplog):
    path = tmp_path / "facts.jsonl"
    lines = [json.dumps(fact("A is", "x")), json.dumps(fact("", "x")), "{oops", json.dumps(fact()),
             json.dumps(fact(target="Lyon")), json.dumps(fact("C is", "z", subject="D"))]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="ftedit.data.loaders"):
        res = load_requests(path, skip_invalid=True)
    assert [r.origin.index for r in res.requests] == [0, 3]
    assert [(i.file, i.index, i.field) for i in res.skipped] == [
        (str(path), 1, "prompt"), (str(path), 2, None), (str(path), 4, "target"), (str(path), 5, "subject")]
    assert res.skipped[1].line == 3 and "record 3" in res.skipped[2].message
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 4


def test_skip_invalid_conflict_keeps_first(tmp_path):
    second = {**rome_record(), "case_id": 1}
    path = write_json(tmp_path / "cf.json", [rome_record(), second, rome_record(target_new={"str": "German"})])
    res = load_requests(path, skip_invalid=True, conflicts="error")
    assert [r.origin.index for r in res.requests] == [0, 1]
    assert [(i.index, i.field) for i in res.skipped] == [(2, "requested_rewrite.target_new")]


# ---------------------------------------------------------------------------------------------- pool facts


def test_pool_facts_from_every_schema(data_dir, tmp_path):
    rome = load_pool_facts(data_dir / ROME_FIXTURE)
    assert rome[0] == PoolFact("The mother tongue of Danielle Darrieux is", "French", "Danielle Darrieux", "P103")
    train = data_dir / "counterfact/easyedit/counterfact-train.json"
    raw = json.loads(train.read_text())[7]
    assert load_pool_facts(train, offset=7, n=1) == [PoolFact(raw["prompt"], raw["ground_truth"], raw["subject"])]
    zsre = load_pool_facts(data_dir / "zsre/zsre_mend_train_1k.json")
    assert len(zsre) == 1000 and zsre[0].target != "" and zsre[0].subject in zsre[0].prompt
    path = write_jsonl(tmp_path / "pool.jsonl", [fact(target_true="Paris", target="Lyon"), fact("Water boils at", "100")])
    assert [(f.target, f.subject) for f in load_pool_facts(path)] == [("Paris", ""), ("100", "")]


def test_pool_facts_validate_and_skip(tmp_path, caplog):
    path = write_json(tmp_path / "cf.json", [rome_record(), rome_record(target_true=None), rome_record(subject=" ")])
    with pytest.raises(RequestValidationError) as err:
        load_pool_facts(path)
    assert_names(err, path, 1, "requested_rewrite.target_true")
    with caplog.at_level(logging.WARNING, logger="ftedit.data.loaders"):
        assert len(load_pool_facts(path, skip_invalid=True)) == 1
    assert "record 2" in caplog.text


def test_find_conflicts():
    reqs = [EditRequest("p", "", "a"), EditRequest("q", "", "b"), EditRequest("p ", "", "a"), EditRequest("p", "", "c")]
    assert find_conflicts(reqs) == [(0, 3)]


# ---------------------------------------------------------------------------------------------- real data


def test_real_counterfact_files_load_whole(data_dir):
    start = time.perf_counter()
    edit = load_requests(data_dir / EASYEDIT_EDIT)
    full = load_requests(data_dir / FULL_UNION)
    assert time.perf_counter() - start < 5
    assert (len(edit.requests), edit.skipped) == (10_000, [])
    assert (len(full.requests), full.skipped) == (9_007, [])
    assert all(len(r.paraphrase_prompts) == 2 and len(r.neighborhood) == 10 for r in full.requests)
    # Genuine same-prompt/different-target cases (multi-valued relations such as P190 "twin city"): kept.
    assert len(find_conflicts(edit.requests)) == 79
    assert len(find_conflicts(full.requests)) == 283
