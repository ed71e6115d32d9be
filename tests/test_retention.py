"""Retention study (paper 002): freezing utilities, protect_edits, stopping rules, filter, fallback, report."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from ftedit.data.examples import PoolFact
from ftedit.data.requests import EditRequest
from ftedit.forward import per_example_nll
from ftedit.methods import apply_method
from ftedit.outputs import build_manifest
from ftedit.params import find_blocks
from ftedit.retention import (
    DownstreamConfig,
    MentionFilter,
    ProtectEditsCallback,
    StoppingRule,
    StudyConfig,
    TaskConfig,
    apply_strategy,
    build_task,
    classify_fallback,
    edit_terms,
    finetune,
    freeze_all_but_window,
    freeze_below,
    protect_edits,
    run_study,
    write_report,
)
from ftedit.retention.measure import RetentionProbe, disjoint_facts
from ftedit.retention.tasks import DownstreamTask
from ftedit.tokenization import encode_text, pad_right

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
         "The lazy dog sleeps.", "The capital of France is Paris."]


def _train_steps(model, tok, steps: int = 3, lr: float = 1e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    batch = pad_right([encode_text(tok, t) for t in TEXTS], tok.pad_token_id)
    model.train()
    for _ in range(steps):
        per_example_nll(model, batch)[0].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    model.eval()


def _changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.detach().equal(before[n])}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _block_params(model, layers) -> set[str]:
    prefix, _ = find_blocks(model)
    return {n for n, _ in model.named_parameters() if any(n.startswith(f"{prefix}.{i}.") for i in layers)}


def test_freeze_below_trains_only_upper_blocks(llama_model, llama_tok):
    before = _snapshot(llama_model)
    handle = freeze_below(llama_model, 2)
    _train_steps(llama_model, llama_tok)
    frozen_blocks = _block_params(llama_model, [0, 1])
    assert set(handle.frozen) >= frozen_blocks
    assert not (_changed(llama_model, before) & set(handle.frozen))
    assert all(p.grad is None for n, p in llama_model.named_parameters() if n in handle.frozen)
    assert _block_params(llama_model, [2]) <= _changed(llama_model, before)
    handle.undo()
    assert all(p.requires_grad for p in llama_model.parameters())


def test_freeze_all_but_window_trains_only_the_window(gpt2_model, gpt2_tok):
    before = _snapshot(gpt2_model)
    with freeze_all_but_window(gpt2_model, "1"):
        _train_steps(gpt2_model, gpt2_tok)
    changed = _changed(gpt2_model, before)
    window = _block_params(gpt2_model, [1])
    assert changed and changed <= window
    assert "transformer.wte.weight" not in changed
    assert all(p.requires_grad for p in gpt2_model.parameters())  # the context manager undid it


def _edit_manifest(model, tok):
    request = EditRequest(prompt="The capital of France is", subject="France", target_new="Rome",
                          target_true="Paris")
    applied = apply_method("locft-bf", model, tok, [request], overrides=["train.epochs=1"], progress=False)
    manifest = build_manifest(applied, [request], {"spec": "tiny"})
    for p in model.parameters():
        p.requires_grad_(True)
    return applied, manifest


@pytest.mark.parametrize("fixture", ["gpt2_model", "gemma_model"])
def test_protect_edits_from_manifest_file(fixture, request, tmp_path, gpt2_tok, llama_tok):
    model = request.getfixturevalue(fixture)
    tok = gpt2_tok if fixture == "gpt2_model" else llama_tok
    applied, manifest = _edit_manifest(model, tok)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    touched = {t.name for t in applied.touched}
    before = _snapshot(model)
    handle = protect_edits(model, tmp_path)  # the output folder of `ftedit edit`
    assert {n.rsplit(".", 1)[0] for n in handle.frozen} == touched
    _train_steps(model, tok)
    changed = _changed(model, before)
    assert not changed & set(handle.frozen)
    assert len(changed) > len(handle.frozen)  # everything else still trains
    handle.undo()
    assert all(p.requires_grad for p in model.parameters())


def test_protect_edits_rejects_bad_manifests(gpt2_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        protect_edits(gpt2_model, tmp_path)
    with pytest.raises(ValueError, match="touched.modules"):
        protect_edits(gpt2_model, {"touched": {}})
    with pytest.raises(ValueError, match="not in this"):
        protect_edits(gpt2_model, [{"name": "nope.mlp", "layer": 99, "role": "down"}])


def test_protect_edits_trainer_callback(gpt2_model, gpt2_tok, tmp_path):
    from transformers import Trainer, TrainingArguments

    applied, manifest = _edit_manifest(gpt2_model, gpt2_tok)
    before = _snapshot(gpt2_model)
    rows = [{"input_ids": list(encode_text(gpt2_tok, t).input_ids)} for t in TEXTS[:2]]
    rows = [{**r, "labels": r["input_ids"]} for r in rows if len(r["input_ids"]) == len(rows[0]["input_ids"])]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_strategy="no", disable_tqdm=True)
    callback = ProtectEditsCallback(manifest)
    Trainer(model=gpt2_model, args=args, train_dataset=rows, callbacks=[callback]).train()
    changed = _changed(gpt2_model, before)
    touched = {f"{t.name}.weight" for t in applied.touched}
    assert changed and not changed & touched
    assert all(p.requires_grad for p in gpt2_model.parameters())


def test_apply_strategy_names():
    with pytest.raises(ValueError, match="unknown freezing strategy"):
        apply_strategy(torch.nn.Linear(2, 2), "freeze-everything")
    with pytest.raises(ValueError, match="manifest"):
        apply_strategy(torch.nn.Linear(2, 2), "edits")


class _ScriptedTask(DownstreamTask):
    """Validation returns scripted values; the loss trains a real tiny model."""

    def __init__(self, values, tok):
        cfg = TaskConfig("lm", "scripted")
        items = [encode_text(tok, t) for t in TEXTS]
        super().__init__(cfg, tok, items, items[:1], 0)
        self.values = list(values)

    def loss(self, model, items):
        return per_example_nll(model, pad_right(list(items), self.tok.pad_token_id))[0].mean()

    def validate(self, model):
        return self.values.pop(0)


def test_stopping_rule_threshold_vs_cap():
    rule = StoppingRule("val_loss", 2.0, "below", max_steps=10, eval_every=5)
    assert rule.decide(5, 2.5) is None and rule.decide(5, 1.9) == "threshold" and rule.decide(10, 2.5) == "max_steps"
    acc = StoppingRule("val_accuracy", 0.9, "above", max_steps=10)
    assert acc.decide(3, 0.95) == "threshold" and acc.decide(3, 0.9) is None
    assert StoppingRule("val_loss", None, "below", max_steps=4).decide(4, 0.0) == "max_steps"
    with pytest.raises(ValueError):
        StoppingRule("val_loss", 1.0, "sideways")


def test_finetune_stops_at_threshold_or_cap(gpt2_model, gpt2_tok):
    cfg = DownstreamConfig(lr=1e-3, batch_size=2, max_steps=6, eval_every=2, probe_every=2)
    checkpoints = []
    task = _ScriptedTask([3.0, 2.5, 1.5, 1.0], gpt2_tok)
    log = finetune(gpt2_model, task, StoppingRule("val_loss", 2.0, "below", 6, 2), cfg, checkpoints.append)
    assert (log.stopped_by, log.steps, checkpoints) == ("threshold", 4, [2, 4])
    task = _ScriptedTask([3.0] * 5, gpt2_tok)
    log = finetune(gpt2_model, task, StoppingRule("val_loss", 2.0, "below", 6, 2), cfg)
    assert (log.stopped_by, log.steps) == ("max_steps", 6)
    assert [s for s, _ in log.validation] == [0, 2, 4, 6]


def test_mention_filter_whole_words_case_insensitive():
    requests = [EditRequest(prompt="Windows Mobile 6.5 was developed by", subject="Windows Mobile 6.5",
                            target_new="Apple", target_true="Microsoft")]
    f = MentionFilter(edit_terms(requests))
    assert f.mentions("I bought an APPLE pie") and f.mentions("windows mobile 6.5 shipped in 2009")
    assert not f.mentions("Applebee's opened") and not f.mentions("Windows 7 was released")
    kept, removed = f.keep(["Microsoft Office", "a cat", "the apple", "no"], str)
    assert (kept, removed) == (["a cat", "no"], 2)


def test_task_filters_records_and_reports_removed(gpt2_tok, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(["Paris is nice."] * 3 + ["The dog runs."] * 5 + ["A fox naps."] * 4))
    task = build_task(TaskConfig("lm", str(path), n_val=2), gpt2_tok, MentionFilter(["paris", "fox"]))
    assert task.removed == 7 and len(task.train_items) + len(task.val_items) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": 1}\n{"text": "no label"}\n')
    with pytest.raises(ValueError, match="record 1: missing field 'label'"):
        build_task(TaskConfig("classification", str(bad)), gpt2_tok, MentionFilter([]))


def test_fallback_classification(gpt2_tok):
    probe = RetentionProbe("edited", "The capital of France is", "Rome", "France", "{} capital", original="Paris")
    related = {("italy", "Rome"), ("england", "London"), ("germany", "Berlin")}
    ids = {w: gpt2_tok(" " + w)["input_ids"][0] for w in ("Paris", "London", "dog")}
    assert len(set(ids.values())) == 3
    assert classify_fallback(gpt2_tok, probe, ids["Paris"], related) == "original"
    assert classify_fallback(gpt2_tok, probe, ids["London"], related) == "related"
    assert classify_fallback(gpt2_tok, probe, ids["dog"], related) == "other"
    assert classify_fallback(gpt2_tok, probe, None, related) == "other"


def test_disjoint_intrinsic_facts():
    requests = [EditRequest(prompt="France's capital is", subject="France", target_new="Rome", target_true="Paris")]
    pool = [PoolFact("France's anthem is", "Marseillaise", "France"),  # same subject
            PoolFact("Spain's capital is", "Madrid", "Spain"),  # same relation template
            PoolFact("The dog likes", "Paris", "The dog"),  # edited object
            PoolFact("The fox eats", "mice", "The fox")]
    assert [f.subject for f in disjoint_facts(pool, requests)] == ["The fox"]


def _teach(model, tok, pairs, steps=60):
    """Make the tiny random model 'know' some facts, so the intrinsic set is not empty."""
    from ftedit.tokenization import encode_pair

    batch = pad_right([encode_pair(tok, p, t) for p, t in pairs], tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        per_example_nll(model, batch)[0].mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_tiny_study_end_to_end(gpt2_model, gpt2_tok, tmp_path):
    edits = [{"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "target_true": "Paris"},
             {"prompt": "The lazy dog eats", "subject": "lazy dog", "target_new": "London", "target_true": "fox"}]
    known = [("The quick brown fox jumps over the", "dog"), ("The brown cat likes", "capital")]
    pool = [{"prompt": p, "target": t, "subject": p.split(" ")[2]} for p, t in known]
    pool += [{"prompt": "A brown bird sees", "target": "Paris", "subject": "bird"}]
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in edits))
    (tmp_path / "pool.jsonl").write_text("\n".join(json.dumps(e) for e in pool))
    (tmp_path / "wiki.txt").write_text("\n".join(["The quick brown fox jumps.", "Paris is in France.",
                                                  "The sun is hot.", "Birds fly south."] * 3))
    (tmp_path / "facts.jsonl").write_text("\n".join(json.dumps({"prompt": f"The sun number {i} is", "target": "hot",
                                                                 "subject": f"sun number {i}"}) for i in range(4)))
    (tmp_path / "cls.csv").write_text("text,label\n" + "\n".join(["good movie,1", "bad movie,0"] * 6))
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps({"prompt": "Say hi", "response": "hi there"})
                                                  for _ in range(6)))
    _teach(gpt2_model, gpt2_tok, known)
    tasks = [TaskConfig("lm", str(tmp_path / "wiki.txt"), threshold=0.0, n_val=2),
             TaskConfig("classification", str(tmp_path / "cls.csv"), threshold=1.0, n_val=2),
             TaskConfig("sft", str(tmp_path / "sft.jsonl"), threshold=0.0, n_val=2),
             TaskConfig("facts", str(tmp_path / "facts.jsonl"), threshold=1.0, n_val=1)]
    cfg = StudyConfig(tasks=tasks, intrinsic_pool=str(tmp_path / "pool.jsonl"), edits=str(tmp_path / "edits.jsonl"),
                      n_edits=2, overrides=["train.epochs=15", "train.lr=1e-2", "params.layers=all"],
                      strategies=["none", "edits", "below:1"], n_intrinsic=5,
                      downstream=DownstreamConfig(lr=1e-3, batch_size=2, max_steps=2, eval_every=1, probe_every=1))
    partial = []
    result = run_study(cfg, gpt2_model, gpt2_tok, progress=False, on_partial=partial.append)
    assert [len(p["runs"]) for p in partial] == list(range(1, 13)) and not partial[0]["complete"]
    assert result["complete"] and result["n_intrinsic"] >= 1 and result["n_edits"] == 2
    assert {(r["task"], r["strategy"]) for r in result["runs"]} == {
        (t, s) for t in ("lm", "classification", "sft", "facts") for s in ("none", "edits", "below:1")}
    lm = {t["kind"]: t for t in result["tasks"]}["lm"]
    # "Paris is in France." names edit 1, "The quick brown fox jumps." edit 2's original object; 3 copies each
    assert lm["removed_by_filter"] == 6
    for run in result["runs"]:
        assert run["log"]["stopped_by"] == "max_steps" and run["log"]["steps"] == 2
        assert [c["step"] for c in run["curve"]] == [0, 1, 2]
        assert all(len(s["top3"][0]) == 3 for s in run["snapshots"])
    frozen = {r["strategy"]: r["frozen_parameters"] for r in result["runs"] if r["task"] == "lm"}
    assert frozen["none"] == 0 < frozen["edits"]
    paths = write_report(tmp_path / "out", result)
    saved = json.loads(paths["result.json"].read_text())
    assert saved["runs"][0]["curve"] == result["runs"][0]["curve"]
    assert paths["retention_lm.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["report.md"].read_text()
    assert "| lm | edits |" in text and "Table 1" in text and "![lm](retention_lm.png)" in text


def test_report_writer_from_a_result(tmp_path):
    snap = {"label": "post-edit", "step": 0, "known": [True, False], "first_token": ["Rome", "x"],
            "first_token_id": [1, 2], "top3": [[("Rome", 0.9), ("Paris", 0.05), ("the", 0.01)]] * 2}
    end = {**snap, "label": "step 5", "step": 5, "known": [False, False]}
    run = {"method": "locft-bf", "task": "lm", "strategy": "none", "frozen_parameters": 0,
           "log": {"steps": 5, "stopped_by": "threshold", "validation": [(0, 3.0), (5, 2.0)]},
           "curve": [{"step": 0, "label": "post-edit", "edited": 100.0, "intrinsic": 0.0},
                     {"step": 5, "label": "step 5", "edited": 0.0, "intrinsic": 0.0}],
           "snapshots": [snap, end], "lost_edits": [{"index": 0, "fallback": "related"}],
           "fallback": {"related": 1}, "final_metric": 2.0,
           "retention": {"edited": {"rate": 0.0, "low": 0.0, "high": 0.0, "n": 1}},
           "gap_edited_minus_intrinsic": {"gap": None, "low": None, "high": None},
           "drift": {"edited": {"n": 1, "top1_changed": 0.0, "target_left_top3": 0.0}}}
    result = {"config": {"downstream": {}}, "protocol": "mass", "n_edits": 1, "n_intrinsic": 1,
              "edits": [{"method": "locft-bf", "touched": [{"name": "h.1.mlp"}],
                         "location": {"source": "shipped", "layer": 1, "module": "down"}}], "intrinsic_selection": {},
              "wall_seconds": 1.0, "tasks": [{"kind": "lm", "source": "x", "metric": "val_loss",
                                              "direction": "below", "threshold": 2.5, "n_train": 3, "n_val": 1,
                                              "removed_by_filter": 4}],
              "probes": [{"kind": "edited", "prompt": "P", "target": "Rome", "original": "Paris"},
                         {"kind": "intrinsic", "prompt": "Q", "target": "x", "original": None}],
              "base": {**snap, "label": "base", "known": [False, True]}, "runs": [run]}
    paths = write_report(tmp_path, result)
    text = paths["report.md"].read_text()
    assert ("| locft-bf | lm | none | threshold | 5 | 100.0 / 0.0 -> 0.0 / 0.0 | 0.0 [0.0, 0.0] (n=1) | n/a | n/a | "
            "n/a | 0 / 1 / 0 | 0.0 / n/a | 0.0 / n/a |") in text
    assert "known by the base model: 100.0%" in text
    assert "| locft-bf | lm | none | 0 | - | - | 3.000 -> 2.000 | 5 | +0 | threshold |" in text
    assert "location layer 1 down (shipped)" in text and "Every run stopped by its task's threshold" in text
    assert "Rome (0.900)" in text
    assert json.loads(paths["result.json"].read_text())["plots"] == {"lm": "retention_lm.png"}


def test_relative_threshold_resolves_from_the_base_model(gpt2_model, gpt2_tok, tmp_path):
    from ftedit.retention.tasks import parse_tasks

    path = tmp_path / "t.txt"
    path.write_text("\n".join(TEXTS * 3))
    (cfg,) = parse_tasks([f"lm={path}"], ["lm=rel:0.5"], {"n_val": 2})
    task = build_task(cfg, gpt2_tok, MentionFilter([]))
    base = task.validate(gpt2_model)
    task.resolve_threshold(gpt2_model)
    assert task.config.threshold == pytest.approx(0.5 * base) and task.info["base_validation"] == pytest.approx(base)
    with pytest.raises(ValueError, match="rel:FACTOR"):
        parse_tasks([f"lm={path}"], ["lm=low"], {})


def test_lost_edits_are_those_known_after_editing_and_not_at_the_end(gpt2_tok):
    from ftedit.retention.measure import RetentionSnapshot, lost_edits

    probes = [RetentionProbe("edited", "P1", "Rome", "France", "r", original="Paris"),
              RetentionProbe("edited", "P2", "dog", "Spain", "r", original="fox"),
              RetentionProbe("edited", "P3", "London", "Italy", "r", original="fox"),
              RetentionProbe("intrinsic", "P4", "capital", "Chad", "q")]
    paris = gpt2_tok(" Paris")["input_ids"][0]
    post = RetentionSnapshot("post-edit", 0, [True, True, False, True], [None] * 4, [None] * 4, [[]] * 4)
    end = RetentionSnapshot("step 9", 9, [False, True, False, False], ["Paris", "dog", None, None], [paris, 1, None, None],
                   [[]] * 4)
    lost = lost_edits(probes, post, end, gpt2_tok, {"r": {("france", "Rome")}})
    assert [(x["index"], x["fallback"], x["predicted"]) for x in lost] == [(0, "original", "Paris")]
    assert post.rate(probes, "edited") == pytest.approx(200 / 3) and end.rate(probes, "intrinsic") == 0.0


def test_cli_retention_from_an_edit_output_folder(tmp_path, gpt2_model, gpt2_tok, data_dir):
    from typer.testing import CliRunner

    from ftedit.commands import app

    base = tmp_path / "base"
    gpt2_model.save_pretrained(base)
    gpt2_tok.save_pretrained(base)
    cf = str(data_dir / "fixtures/counterfact_rome_format_first5.json")
    edited = tmp_path / "edited"
    result = CliRunner().invoke(app, ["edit", "--model", str(base), "--data", cf, "--recipe", "locft-bf",
                                      "--set", "train.epochs=2", "--out", str(edited), "--no-eval", "--no-progress"])
    assert result.exit_code == 0, result.output
    (tmp_path / "wiki.txt").write_text("\n".join(["The sun is hot.", "Birds fly south.", "Rain falls."] * 2))
    out = tmp_path / "study"
    args = ["retention", "--out", str(out), "--from-edit", str(edited), "--model", str(base),
            "--intrinsic-pool", cf, "--task", f"lm={tmp_path / 'wiki.txt'}", "--threshold", "lm=rel:0.5",
            "--strategy", "edits", "--strategy", "rehearsal+anchor:1", "--max-steps", "1", "--n-val", "2",
            "--batch-size", "2", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "the step cap stopped" in result.output  # threshold rel:0.5 is out of reach in one step
    saved = json.loads((out / "result.json").read_text())
    assert saved["runs"][1]["protection"]["rehearsal"]["pairs"] == 5 and saved["runs"][1]["anchor_distance"] > 0
    manifest = json.loads((edited / "manifest.json").read_text())
    assert saved["edits"][0]["touched"] == manifest["touched"]["modules"] and saved["n_edits"] == 5
    assert saved["edits"][0]["location"] == manifest["touched"]["location"]
    assert saved["runs"][0]["frozen_parameters"] > 0 and saved["tasks"][0]["threshold_factor"] == 0.5
    assert (out / "report.md").exists() and (out / "retention_lm.png").exists()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 4 and "--overwrite" in again.output


def test_single_protocol_edits_each_fact_alone(gpt2_model, gpt2_tok, tmp_path, data_dir):
    cf = str(data_dir / "fixtures/counterfact_rome_format_first5.json")
    (tmp_path / "wiki.txt").write_text("\n".join(["The sun is hot.", "Birds fly south.", "Rain falls."] * 2))
    before = _snapshot(gpt2_model)
    cfg = StudyConfig(tasks=[TaskConfig("lm", str(tmp_path / "wiki.txt"), threshold=0.0, n_val=2)],
                      intrinsic_pool=cf, edits=cf, n_edits=2, protocol="single", overrides=["train.epochs=2"],
                      strategies=["edits"], downstream=DownstreamConfig(batch_size=2, max_steps=2, probe_every=1))
    result = run_study(cfg, gpt2_model, gpt2_tok, progress=False)
    (run,) = result["runs"]
    (posts,) = result["post_edit"].values()
    assert len(posts) == 2 and run["log"]["runs"] == 2 and len(run["per_edit"]) == 2
    assert run["log"]["stopped_by"] == {"max_steps": 2} and [c["step"] for c in run["curve"]] == [0, 1, 2]
    assert result["cap_stopped"] == [{"method": run["method"], "task": "lm", "strategy": "edits", "runs": 2,
                                      "steps": 2, "final_metric": run["final_metric"]}]
    # each single-edit run probes its own edit and its paraphrases, plus the intrinsic set
    paraphrases = [sum(p["kind"] == "paraphrase" and p["edit"] == i for p in result["probes"]) for i in range(2)]
    assert paraphrases[0] > 0
    assert [len(p["known"]) for p in posts] == [1 + n + result["n_intrinsic"] for n in paraphrases]
    assert _changed(gpt2_model, before)  # the model object is left edited and trained


def test_protect_edits_on_a_plain_torch_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    before = _snapshot(model)
    handle = protect_edits(model, [{"name": "2", "layer": 0, "role": "down"}])
    assert handle.frozen == ["2.weight", "2.bias"]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert _changed(model, before) == {"0.weight", "0.bias"}


# -- protection strategies: freezing through the real loop, L2 anchor, rehearsal -------------------------------

def _lm_task(tok, tmp_path, threshold=0.0, relative=False, n_val=2):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS * 3))
    return build_task(TaskConfig("lm", str(path), threshold=threshold, relative=relative, n_val=n_val), tok,
                      MentionFilter([]))


def _touched_mlp(model, layer: int) -> list[dict]:
    """A manifest entry for the down projection of block ``layer`` (what a one-layer edit touches)."""
    from ftedit.params import block_roles

    prefix, blocks = find_blocks(model)
    name, _ = block_roles(blocks[layer])["down"]
    return [{"name": f"{prefix}.{layer}.{name}", "layer": layer, "role": "down"}]


@pytest.mark.parametrize("spec", ["edits", "around:0", "below:edit", "edits+rehearsal:0.5", "edits+anchor:5"])
def test_frozen_weights_stay_bit_identical_through_finetune(spec, llama_model, llama_tok, tmp_path):
    from ftedit.retention import build_protection

    touched = _touched_mlp(llama_model, 1)
    task = _lm_task(llama_tok, tmp_path)
    before = _snapshot(llama_model)
    protection = build_protection(llama_model, spec, touched, rehearse=[("The capital of France is", "Rome")])
    frozen = {n for h in protection.freeze for n in h.frozen}
    cfg = DownstreamConfig(lr=1e-2, batch_size=4, max_steps=3, eval_every=3, probe_every=3)
    finetune(llama_model, task, task.config.stopping(3, 3), cfg, protection=protection)
    protection.undo()
    edited = {f"{touched[0]['name']}.weight"}
    assert edited <= frozen
    assert all(llama_model.get_parameter(n).equal(before[n]) for n in frozen)
    assert _changed(llama_model, before) - frozen  # the rest trained
    assert all(p.requires_grad for p in llama_model.parameters())


def test_around_and_below_edit_freeze_the_layers_around_the_edit(llama_model):
    from ftedit.retention import build_protection

    n_layers = len(find_blocks(llama_model)[1])
    touched = _touched_mlp(llama_model, 1)
    with_around = build_protection(llama_model, "around:1", touched)
    assert set(with_around.freeze[0].frozen) == _block_params(llama_model, range(max(0, 0), min(3, n_layers)))
    with_around.undo()
    below = build_protection(llama_model, "below:edit", touched)
    assert _block_params(llama_model, [0, 1]) <= set(below.freeze[0].frozen)
    assert not _block_params(llama_model, range(2, n_layers)) & set(below.freeze[0].frozen)
    below.undo()
    for bad in ("around:x", "rehearsal:2", "anchor:-1", "freeze-all", "none:3"):
        with pytest.raises(ValueError):
            build_protection(llama_model, bad, touched, rehearse=[("a", "b")])
    assert all(p.requires_grad for p in llama_model.parameters())  # a failed build undoes what it froze


def _anchor_distance(model, tok, tmp_path, lam: float, touched, state, lr: float = 1e-2) -> float:
    from ftedit.retention import build_protection

    model.load_state_dict(state)
    task = _lm_task(tok, tmp_path)
    protection = build_protection(model, f"anchor:{lam}", touched)
    cfg = DownstreamConfig(lr=lr, batch_size=4, max_steps=8, eval_every=8, probe_every=8, max_grad_norm=0)
    finetune(model, task, task.config.stopping(8, 8), cfg, protection=protection)
    return protection.anchor.distance()


def test_l2_anchor_pulls_edited_weights_back(llama_model, llama_tok, tmp_path):
    from ftedit.retention import L2Anchor

    touched = _touched_mlp(llama_model, 1)
    state = {k: v.clone() for k, v in llama_model.state_dict().items()}
    # small lambdas: under AdamW a strong anchor keeps each weight within about one step (lr) of its anchor,
    # so lambdas far above these all reach that floor
    distances = [_anchor_distance(llama_model, llama_tok, tmp_path, lam, touched, state) for lam in (0, 0.03, 0.3)]
    assert distances[0] > 2 * distances[1] > 4 * distances[2] > 0, distances
    weight = llama_model.get_parameter(f"{touched[0]['name']}.weight")
    anchor = L2Anchor({"w": weight}, lam=3.0)
    with torch.no_grad():
        weight.add_(0.5)
    assert anchor.penalty().item() == pytest.approx(3.0 * 0.25 * weight.numel(), rel=1e-4)


def test_rehearsal_batches_never_hold_evaluation_probes(llama_model, llama_tok, tmp_path, monkeypatch):
    from ftedit.data.requests import ProbePrompt
    from ftedit.retention import build_protection, evaluation_prompts, rehearsal_pairs
    finetune_module = importlib.import_module("ftedit.retention.finetune")

    requests = [EditRequest(prompt="The capital of France is", subject="France", target_new="Rome",
                            paraphrase_prompts=("The lazy dog sleeps in",),
                            neighborhood=(ProbePrompt("The capital of Spain is", "Madrid"),)),
                EditRequest(prompt="The lazy dog sleeps in", subject="lazy dog", target_new="London"),
                EditRequest(prompt="The capital of Spain is", subject="Spain", target_new="Paris"),
                EditRequest(prompt="The brown fox eats", subject="brown fox", target_new="mice"),
                EditRequest(prompt="A cat likes", subject="cat", target_new="fish")]
    excluded = evaluation_prompts(requests, ["A cat likes"])  # an intrinsic probe's prompt
    pairs = rehearsal_pairs(requests, excluded)
    assert pairs == [("The capital of France is", "Rome"), ("The brown fox eats", "mice")]
    seen = []
    real = finetune_module.pair_loss
    monkeypatch.setattr(finetune_module, "pair_loss", lambda m, t, batch: seen.append(list(batch)) or real(m, t, batch))
    task = _lm_task(llama_tok, tmp_path)
    protection = build_protection(llama_model, "rehearsal:0.5", rehearse=pairs)
    cfg = DownstreamConfig(lr=1e-3, batch_size=4, max_steps=5, eval_every=5, probe_every=5)
    finetune(llama_model, task, task.config.stopping(5, 5), cfg, protection=protection)
    assert len(seen) == 5 and all(len(b) == 2 for b in seen)  # half of every batch of 4
    rehearsed = {p for b in seen for p, _ in b}
    assert rehearsed == {"The capital of France is", "The brown fox eats"} and not rehearsed & excluded


def test_study_rehearses_only_training_pairs_and_reports_protection(gpt2_model, gpt2_tok, tmp_path, monkeypatch):
    finetune_module = importlib.import_module("ftedit.retention.finetune")

    edits = [{"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "target_true": "Paris",
              "paraphrase_prompts": ["France's capital city is"]},
             {"prompt": "The lazy dog eats", "subject": "lazy dog", "target_new": "London", "target_true": "fox",
              "paraphrase_prompts": ["The capital of France is"]}]
    known = [("The quick brown fox jumps over the", "dog"), ("The brown cat likes", "capital")]
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in edits))
    (tmp_path / "pool.jsonl").write_text("\n".join(json.dumps({"prompt": p, "target": t, "subject": p.split(" ")[2]})
                                                   for p, t in known))
    (tmp_path / "wiki.txt").write_text("\n".join(["The sun is hot.", "Birds fly south.", "Rain falls."] * 4))
    _teach(gpt2_model, gpt2_tok, known)
    seen = []
    real = finetune_module.pair_loss
    monkeypatch.setattr(finetune_module, "pair_loss", lambda m, t, batch: seen.append(list(batch)) or real(m, t, batch))
    cfg = StudyConfig(tasks=[TaskConfig("lm", str(tmp_path / "wiki.txt"), threshold=0.0, n_val=2)],
                      intrinsic_pool=str(tmp_path / "pool.jsonl"), edits=str(tmp_path / "edits.jsonl"),
                      methods=["locft-bf"], overrides=["train.epochs=2", "params.layers=1"], n_intrinsic=5,
                      strategies=["rehearsal:0.5", "edits+anchor:10"],
                      downstream=DownstreamConfig(lr=1e-3, batch_size=2, max_steps=2, eval_every=1, probe_every=1))
    result = run_study(cfg, gpt2_model, gpt2_tok, progress=False)
    probes = {p["prompt"] for p in result["probes"] if p["kind"] != "edited"}
    rehearsed = {p for b in seen for p, _ in b}
    # edit 1's prompt is edit 2's paraphrase (an evaluation probe): only edit 2's training pair is rehearsed
    assert rehearsed == {"The lazy dog eats"} and not rehearsed & probes and len(seen) == 2
    runs = {r["strategy"]: r for r in result["runs"]}
    assert runs["rehearsal:0.5"]["protection"]["rehearsal"] == {"share": 0.5, "pairs": 1}
    assert runs["edits+anchor:10"]["anchor_distance"] == 0.0  # the edited modules are frozen too
    assert runs["edits+anchor:10"]["frozen_parameters"] > 0
    stats = runs["rehearsal:0.5"]["retention"]
    assert set(stats) <= {"edited", "paraphrase", "intrinsic"}
    text = write_report(tmp_path / "out", result)["report.md"].read_text()
    assert "Cost of each strategy" in text and "| locft-bf | lm | rehearsal:0.5 |" in text


# -- stopping by threshold, SFT masking, the edit at ftedit's resolved location --------------------------------

def test_threshold_stops_an_easy_task_before_the_cap(llama_model, llama_tok, tmp_path):
    task = _lm_task(llama_tok, tmp_path, threshold=0.8, relative=True)
    task.resolve_threshold(llama_model)
    cfg = DownstreamConfig(lr=3e-3, batch_size=4, max_steps=200, eval_every=2, probe_every=50)
    log = finetune(llama_model, task, task.config.stopping(cfg.max_steps, cfg.eval_every), cfg)
    assert log.stopped_by == "threshold" and log.steps < cfg.max_steps
    assert log.validation[-1][1] < task.config.threshold <= log.validation[-2][1]


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("chat", [True, False])
def test_sft_masks_the_prompt(chat, gpt2_model, gpt2_tok, tmp_path):
    import copy

    from ftedit.retention.tasks import SFT_TEMPLATE
    from ftedit.tokenization import chat_prompt, encode_prompt

    tok = copy.deepcopy(gpt2_tok)
    tok.chat_template = CHAT if chat else None
    rows = [{"prompt": f"Say hi number {i}", "response": f"hi there {i}"} for i in range(4)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = build_task(TaskConfig("sft", str(tmp_path / "sft.jsonl"), threshold=1.0, n_val=1, max_length=200), tok,
                      MentionFilter([]))
    assert task.info["template"] == ("chat" if chat else SFT_TEMPLATE)
    for item in task.train_items + task.val_items:
        prompt_text = tok.decode(item.input_ids[:item.target_start])
        row = next(r for r in rows if r["prompt"] in prompt_text)
        head = chat_prompt(tok, row["prompt"]) if chat else SFT_TEMPLATE.format(prompt=row["prompt"])
        assert item.target_start == len(encode_prompt(tok, head))
        assert tok.decode(item.target_ids).strip().startswith(row["response"])
        assert tok.decode(item.target_ids).endswith("<|end|>" if chat else tok.eos_token)
    # the loss counts response tokens only: it equals the NLL of those tokens and not that of the whole text
    item = task.train_items[0]
    loss = task.loss(gpt2_model, [item])
    logits = gpt2_model(torch.tensor([item.input_ids])).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(item.input_ids[1:]), reduction="none")
    assert loss.item() == pytest.approx(nll[item.target_start - 1:].mean().item(), rel=1e-4)
    assert loss.item() != pytest.approx(nll.mean().item(), rel=1e-3)


def test_study_edits_at_the_location_resolve_location_chooses(gpt2_model, gpt2_tok, tmp_path, monkeypatch, data_dir):
    import ftedit.methods

    calls = []
    real = ftedit.methods.resolve_location

    def spy(model, tok, config, identity=None, *args, **kwargs):
        chosen, record = real(model, tok, config, identity, *args, **kwargs)
        calls.append((identity, config.params.layers, chosen.params.layers))
        return chosen, record

    monkeypatch.setattr(ftedit.methods, "resolve_location", spy)
    cf = str(data_dir / "fixtures/counterfact_rome_format_first5.json")
    (tmp_path / "wiki.txt").write_text("\n".join(["The sun is hot.", "Birds fly south.", "Rain falls."] * 2))
    identity = type("Identity", (), {"fingerprint": "tiny-gpt2", "source": "local"})()
    cfg = StudyConfig(tasks=[TaskConfig("lm", str(tmp_path / "wiki.txt"), threshold=0.0, n_val=2)],
                      intrinsic_pool=cf, edits=cf, n_edits=2, methods=["locft-bf"], overrides=["train.epochs=1"],
                      strategies=["edits"], downstream=DownstreamConfig(batch_size=2, max_steps=1, probe_every=1))
    result = run_study(cfg, gpt2_model, gpt2_tok, progress=False, identity=identity)
    ((seen_identity, asked, chosen),) = calls
    assert seen_identity is identity and asked == "auto"
    (edit,) = result["edits"]
    assert edit["location"]["layer"] == int(chosen) and {m["layer"] for m in edit["touched"]} == {int(chosen)}
    assert result["runs"][0]["frozen_parameters"] > 0


def test_missing_threshold_is_refused(tmp_path):
    from ftedit.errors import UsageError
    from ftedit.retention.tasks import parse_tasks

    with pytest.raises(UsageError, match="--threshold missing for \\['sft'\\]"):
        parse_tasks(["lm=a.txt", "sft=b.jsonl"], ["lm=2.0"], {})
    with pytest.raises(ValueError, match="threshold"):
        StudyConfig(tasks=[TaskConfig("lm", "a.txt")], intrinsic_pool="p.json")


def test_bootstrap_intervals_cover_the_rate_and_shrink_with_more_facts():
    from ftedit.retention.stats import bootstrap, bootstrap_gap

    small = bootstrap([True, False] * 5)
    large = bootstrap([True, False] * 200)
    assert small["rate"] == large["rate"] == 50.0
    assert small["low"] < 50 < small["high"] and large["high"] - large["low"] < small["high"] - small["low"]
    assert bootstrap([True] * 7) == {"rate": 100.0, "low": 100.0, "high": 100.0, "n": 7}
    gap = bootstrap_gap([True] * 9 + [False], [True, False] * 5)
    assert gap["gap"] == pytest.approx(40.0) and gap["low"] < 40 < gap["high"]


def test_run_statistics_count_only_what_was_known_after_editing(gpt2_tok):
    from ftedit.retention.measure import RetentionSnapshot
    from ftedit.retention.stats import run_statistics

    probes = [RetentionProbe("edited", "P1", "Rome", "France", "r", "Paris", 0),
              RetentionProbe("edited", "P2", "dog", "Spain", "r", "fox", 1),
              RetentionProbe("paraphrase", "P1b", "Rome", "France", "r", "Paris", 0),
              RetentionProbe("intrinsic", "Q1", "capital", "Chad", "q"),
              RetentionProbe("intrinsic", "Q2", "the", "Peru", "q")]
    from ftedit.tokenization import encode_target

    rome = gpt2_tok.decode([encode_target(gpt2_tok, "Rome")[0]]).strip()  # the tiny tokenizer splits words
    top = [[(rome, 0.9), ("Paris", 0.05), ("the", 0.01)]] * 5
    post = RetentionSnapshot("post-edit", 0, [True, False, True, True, False], [None] * 5, [None] * 5, top)
    end_top = [[("Paris", 0.6), ("the", 0.2), ("a", 0.1)]] + top[1:]
    end = RetentionSnapshot("step 4", 4, [False, True, True, True, True], [None] * 5, [None] * 5, end_top)
    stats = run_statistics(gpt2_tok, probes, post, end)
    # P2 and Q2 were not known after editing: neither counts, whatever they are at the end
    assert {k: (v["rate"], v["n"]) for k, v in stats["retention"].items()} == {
        "edited": (0.0, 1), "paraphrase": (100.0, 1), "intrinsic": (100.0, 1)}
    assert stats["gap_edited_minus_intrinsic"]["gap"] == -100.0
    assert stats["drift"]["edited"] == {"n": 2, "top1_changed": 50.0, "target_left_top3": 50.0}
    assert stats["probe_drift"][0]["end_top3"][0] == ("Paris", 0.6)


def test_overrides_apply_to_all_methods_or_to_the_one_named():
    from ftedit.retention.study import _overrides_for

    overrides = ["train.epochs=3", "ft:params.layers=1", "locft-bf:params.layers=4:9", "params.modules=down"]
    assert _overrides_for("ft", overrides) == ["train.epochs=3", "params.layers=1", "params.modules=down"]
    assert _overrides_for("locft-bf", overrides) == ["train.epochs=3", "params.layers=4:9", "params.modules=down"]
    assert _overrides_for("rome", overrides) == ["train.epochs=3", "params.modules=down"]
    with pytest.raises(ValueError, match="not in the study"):
        StudyConfig(tasks=[TaskConfig("lm", "a.txt", threshold=1.0)], intrinsic_pool="p.json", methods=["ft"],
                    overrides=["locft-bf:train.epochs=2"])


def test_each_method_edits_the_base_weights(llama_model, llama_tok, tmp_path, data_dir, monkeypatch):
    import ftedit.retention.study as study

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join((data_dir / "downstream" / "wiki_summaries.jsonl").read_text().splitlines()[:12]))
    cf = str(data_dir / "fixtures/counterfact_rome_format_first5.json")
    (tmp_path / "wiki.txt").write_text("\n".join(["The sun is hot.", "Birds fly south.", "Rain falls."] * 2))
    base = _snapshot(llama_model)
    starts = []
    real = study.apply_spec

    def spy(spec, config, model, *args, **kwargs):
        starts.append(spec.name if all(p.detach().equal(base[n]) for n, p in model.named_parameters()) else None)
        return real(spec, config, model, *args, **kwargs)

    monkeypatch.setattr(study, "apply_spec", spy)
    cfg = StudyConfig(tasks=[TaskConfig("lm", str(tmp_path / "wiki.txt"), threshold=0.0, n_val=2)],
                      intrinsic_pool=cf, edits=cf, n_edits=2, methods=["locft-bf", "rome"],
                      overrides=["locft-bf:train.epochs=1", "locft-bf:params.layers=1", f"rome:stats.corpus={corpus}",
                                 "rome:stats.n_samples=6", "rome:stats.max_length=32", "rome:value.steps=2"],
                      strategies=["none", "edits"],
                      downstream=DownstreamConfig(lr=1e-2, batch_size=2, max_steps=1, probe_every=1))
    result = run_study(cfg, llama_model, llama_tok, progress=False)
    assert starts == ["locft-bf", "rome"]  # the second method edits the base model, not the first's edit or runs
    assert [(r["method"], r["strategy"]) for r in result["runs"]] == [
        ("locft-bf", "none"), ("locft-bf", "edits"), ("rome", "none"), ("rome", "edits")]
    assert set(result["post_edit"]) == {"locft-bf", "rome"} and len(result["edits"]) == 2
    assert result["edits"][0]["location"] == {"source": "config"}


def test_an_interrupted_study_resumes_with_its_finished_runs(tmp_path, gpt2_model, gpt2_tok, data_dir, monkeypatch):
    from typer.testing import CliRunner

    import ftedit.retention.study as study
    from ftedit.commands import app

    base = tmp_path / "base"
    gpt2_model.save_pretrained(base)
    gpt2_tok.save_pretrained(base)
    cf = str(data_dir / "fixtures/counterfact_rome_format_first5.json")
    (tmp_path / "wiki.txt").write_text("\n".join(["The sun is hot.", "Birds fly south.", "Rain falls."] * 2))

    def args(out, *extra):
        return ["retention", "--out", str(out), "--model", str(base), "--edits", cf, "--n", "2",
                "--intrinsic-pool", cf, "--task", f"lm={tmp_path / 'wiki.txt'}", "--threshold", "lm=0",
                "--method", "locft-bf", "--set", "train.epochs=1", "--set", "params.layers=1",
                "--strategy", "none", "--strategy", "edits", "--max-steps", "2", "--probe-every", "1",
                "--n-val", "2", "--batch-size", "2", "--no-progress", *extra]

    real, calls = study._one_run, []

    def interrupt_second(*a, **kw):
        calls.append(a[3])  # the strategy
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    out = tmp_path / "study"
    monkeypatch.setattr(study, "_one_run", interrupt_second)
    stopped = CliRunner().invoke(app, args(out))
    assert stopped.exit_code == 130 and "1 finished downstream runs are kept" in stopped.output
    assert "--resume" in stopped.output
    partial = json.loads((out / "result.json").read_text())
    assert partial["complete"] is False and [r["strategy"] for r in partial["runs"]] == ["none"]

    refused = CliRunner().invoke(app, args(out))
    assert refused.exit_code == 4 and "interrupted study" in refused.output and "--resume" in refused.output
    other = CliRunner().invoke(app, args(out, "--lr", "1e-3", "--resume"))
    assert other.exit_code != 0 and "config.downstream" in other.output

    calls.clear()
    monkeypatch.setattr(study, "_one_run", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    resumed = CliRunner().invoke(app, args(out, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert calls == ["edits"]  # only the missing run ran
    done = json.loads((out / "result.json").read_text())
    assert done["complete"] is True and [r["strategy"] for r in done["runs"]] == ["none", "edits"]
    assert done["runs"][0] == partial["runs"][0]

    calls.clear()
    fresh = CliRunner().invoke(app, args(tmp_path / "fresh"))
    assert fresh.exit_code == 0 and calls == ["none", "edits"]
    whole = json.loads((tmp_path / "fresh" / "result.json").read_text())
    for a, b in zip(done["runs"], whole["runs"]):  # the resumed study ends where an uninterrupted one does
        assert a["curve"] == b["curve"] and a["final_metric"] == b["final_metric"]
    assert CliRunner().invoke(app, args(out, "--resume")).exit_code == 4  # complete: nothing to resume
