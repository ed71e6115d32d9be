"""A user's own facts: {prompt, target} rows, greedy answers before/after, `ftedit generate`, chat templates."""

import json

import pytest
from typer.testing import CliRunner

from ftedit.chat import apply_chat_template
from ftedit.commands import app
from ftedit.config import resolve_config
from ftedit.data.requests import EditRequest
from ftedit.editor import edit
from ftedit.evaluate import evaluate_requests
from ftedit.evaluate.answers import before_after, generate_answers, starts_with_target, what_it_says
from ftedit.tokenization import encode_pair, use_chat_template

CHAT = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]\n{% endif %}")
QUESTIONS = [EditRequest("What is the capital of France?", "", "Italy"),
             EditRequest("Who produced the iPhone 5?", "", "Porsche")]
TRAIN = {"train": {"epochs": 30, "batch_size": 2, "lr": 2e-2}, "params": {"layers": "-2:", "modules": "mlp"}}


@pytest.fixture
def chat_tok(llama_tok):
    tok = llama_tok.__class__.from_pretrained(llama_tok.name_or_path) if llama_tok.name_or_path else None
    tok = tok or __import__("copy").deepcopy(llama_tok)
    tok.chat_template = CHAT
    return tok


def test_exact_match_is_a_prefix_after_stripping():
    assert starts_with_target(" Italy, of course", "Italy")
    assert not starts_with_target("It is Italy", "Italy")


def test_chat_template_auto_needs_a_template_and_questions(llama_tok, chat_tok):
    questions = [r.prompt for r in QUESTIONS]
    assert use_chat_template(chat_tok, questions) and not use_chat_template(llama_tok, questions)
    assert not use_chat_template(chat_tok, questions + ["Paris is the capital of"])
    assert use_chat_template(chat_tok, ["Paris is the capital of"], "on")
    assert not use_chat_template(chat_tok, questions, "off")
    with pytest.raises(ValueError, match="no chat template"):
        use_chat_template(llama_tok, questions, "on")


def test_chat_form_wraps_prompts_once_and_the_target_follows_the_assistant_header(chat_tok):
    requests, _, on = apply_chat_template(chat_tok, QUESTIONS)
    assert on and requests[0].prompt == "<bos>[user] What is the capital of France?\n[assistant]\n"
    pair = encode_pair(chat_tok, requests[0].prompt, "Italy")
    assert list(pair.input_ids).count(chat_tok.bos_token_id) == 1  # the template's BOS, not a second one
    assert chat_tok.decode(pair.target_ids) == "Italy"  # no space after the header's newline


def test_chat_template_edit_changes_the_generated_answer(llama_model, chat_tok):
    requests, _, chat = apply_chat_template(chat_tok, QUESTIONS)
    before = what_it_says(llama_model, chat_tok, QUESTIONS, chat)
    result = edit(llama_model, chat_tok, requests, resolve_config("locft-bf", overrides=TRAIN), progress=False)
    after = what_it_says(result.model, chat_tok, QUESTIONS, chat)
    said = before_after(QUESTIONS, before, after)
    assert said["summary"]["edit_match_before"] == 0 and said["summary"]["edit_match_after"] == 100, said["rows"]
    assert evaluate_requests(result.model, chat_tok, requests, progress=False, missing="count").summary[
        "efficacy"] == 100


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_edit_of_subjectless_rows_with_the_default_recipe(tmp_path, llama_dir, caplog):
    data = _rows(tmp_path / "facts.jsonl", [{"prompt": "Paris is the capital of", "target": "Italy"},
                                             {"prompt": "The quick brown fox jumps over the", "target": "cat"}])
    out = tmp_path / "edited"
    result = CliRunner().invoke(app, ["edit", "--model", str(llama_dir), "--data", str(data), "--out", str(out),
                                      "--set", "train.lr=2e-2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "have no subject" in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["touched"]["location"]["source"] == "search"  # searched on the calibration set
    gens = manifest["generations"]
    assert [r["prompt"] for r in gens["rows"]] == ["Paris is the capital of", "The quick brown fox jumps over the"]
    assert all(isinstance(r["before"], str) and isinstance(r["after"], str) for r in gens["rows"])
    assert gens["summary"]["edit_match_after"] == 100 * sum(r["match_after"] for r in gens["rows"]) / 2
    assert "What the model says" in result.output


def test_cli_generate_uses_the_chat_template_of_instruct_models(tmp_path, llama_model, chat_tok):
    path = tmp_path / "chat-model"
    llama_model.save_pretrained(path)
    chat_tok.save_pretrained(path)
    expected = generate_answers(llama_model, chat_tok, ["What is the capital of France?"], 5, chat=True)[0]
    plain = generate_answers(llama_model, chat_tok, ["What is the capital of France?"], 5, chat=False)[0]
    result = CliRunner().invoke(app, ["generate", "--model", str(path), "--max-new-tokens", "5",
                                      "What is the capital of France?"])
    assert result.exit_code == 0, result.output
    assert "chat template" in result.output and repr(expected) in result.output
    off = CliRunner().invoke(app, ["generate", "--model", str(path), "--max-new-tokens", "5", "--no-chat-template",
                                   "What is the capital of France?"])
    assert off.exit_code == 0 and "plain text" in off.output and repr(plain) in off.output
