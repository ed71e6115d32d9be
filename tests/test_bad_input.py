"""A catalogue of malformed input, each fed to the real command line.

Every refusal must exit with its documented code (ftedit.errors), print no traceback, name the file, record and
field where there is one, and happen before a model is loaded.
"""

from __future__ import annotations

import codecs
import csv
import errno
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ftedit.pipeline
from ftedit.atomic import PARTIAL_MARKER
from ftedit.commands import app
from ftedit.errors import EXIT_BUG, EXIT_INPUT, EXIT_MODEL, EXIT_OUTPUT
from ftedit.outputs import prepare_output_dir

ROME_FIXTURE = "fixtures/counterfact_rome_format_first5.json"
FAST = ["--recipe", "locft-bf", "--no-progress", "--set", "train.epochs=2", "--set", "params.layers=-1",
        "--set", "train.lr=1e-2"]


def fact(**over) -> dict:
    return {"prompt": "The capital of France is", "subject": "France", "target": "Rome", "target_true": "Paris",
            **over}


def rome(**rw) -> dict:
    base = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}}
    return {"case_id": 0, "requested_rewrite": {**base, **rw}, "paraphrase_prompts": ["She speaks"]}


@pytest.fixture
def no_model_load(monkeypatch):
    """Refusals must come before the model is loaded: loading it fails the test."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")
    monkeypatch.setattr(ftedit.pipeline, "load_model", load_model)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, f"{needle!r} not in {result.output!r}"


def edit(data, out, model, *extra):
    return invoke("edit", "--data", data, "--out", out, "--model", model, *FAST, *extra)


# ---------------------------------------------------------------------------------------------- edit files

def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


BAD_FILES = [
    # name, content, what the message must name
    ("truncated.json", '[{"prompt": "A is", "target": "B"},', ["truncated.json", "line 1", "not valid JSON"]),
    ("object.json", json.dumps(fact()), ["object.json", "list of objects, got dict"]),
    ("empty_list.json", "[]", ["empty_list.json", "holds no edit requests"]),
    ("empty.jsonl", "", ["empty.jsonl", "the file is empty"]),
    ("blank.csv", "\n\n", ["blank.csv", "the file is empty"]),
    ("missing_target.jsonl", json.dumps({"prompt": "A is"}), ["record 0", "'target'", "missing required field"]),
    ("int_target.jsonl", json.dumps(fact(target=5)), ["record 0", "'target'", "must be a string, got int"]),
    ("empty_prompt.jsonl", json.dumps(fact(prompt=" ", subject=None)), ["record 0", "'prompt'", "is empty"]),
    ("nan.jsonl", '{"prompt": "A is", "target": "B", "case_id": NaN}', ["nan.jsonl", "record 0", "NaN"]),
    ("infinity.json", '[{"prompt": "A is", "target": "B", "case_id": Infinity}]', ["infinity.json", "Infinity"]),
    ("float_id.jsonl", json.dumps(fact(case_id=1.5)), ["record 0", "'case_id'", "string or an integer"]),
    ("bad_line.jsonl", json.dumps(fact()) + "\n{oops\n", ["record 1", "line 2", "malformed JSON"]),
    ("list_record.json", json.dumps([["A is", "B"]]), ["record 0", "must be an object, got list"]),
    ("no_slot.json", json.dumps([rome(prompt="The mother tongue of Danielle Darrieux is")]),
     ["record 0", "'requested_rewrite.prompt'", "no '{}' slot"]),
    ("noop.json", json.dumps([rome(target_new={"str": "French"})]),
     ["record 0", "'requested_rewrite.target_new'", "equals the true target"]),
    ("noop.jsonl", json.dumps(fact(target="Paris")), ["record 0", "'target'", "equals the true target"]),
    ("newline.jsonl", json.dumps(fact(target="Rome\nItaly")), ["record 0", "'target'", "line break"]),
    ("duplicate.jsonl", json.dumps(fact()) + "\n" + json.dumps(fact()), ["record 1", "exact duplicate of record 0",
                                                                        "--skip-invalid"]),
    ("conflict.jsonl", json.dumps(fact()) + "\n" + json.dumps(fact(target="Lyon")), ["record 1", "'target'"]),
    ("subject_absent.jsonl", json.dumps(fact(subject="Spain")), ["record 0", "'subject'", "does not occur"]),
    ("extra_cells.csv", "prompt,target\nA is,B,C\n", ["extra_cells.csv", "record 0", "more cells than the header"]),
    ("binary.json", bytes(range(256)) * 4, ["binary.json", "not a text file"]),
    ("latin1.csv", "prompt,target\nLa capitale de la Fran\xe7e est,Rome\n".encode("latin-1"),
     ["latin1.csv", "not valid UTF-8", "save the file as UTF-8"]),
    ("utf16_no_bom.jsonl", json.dumps(fact()).encode("utf-16-le"), ["utf16_no_bom.jsonl", "UTF-16 without a byte-order mark"]),
]


@pytest.mark.parametrize("name,content,needles", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_edit_file_is_refused_before_loading_the_model(tmp_path, llama_dir, no_model_load, name, content,
                                                          needles):
    path = _write(tmp_path / name, content)
    result = edit(path, tmp_path / "out", llama_dir)
    assert_refused(result, EXIT_INPUT, *needles)
    assert not (tmp_path / "out").exists()


def test_directory_and_missing_file_as_data(tmp_path, llama_dir, no_model_load):
    assert_refused(edit(tmp_path, tmp_path / "out", llama_dir), EXIT_INPUT, str(tmp_path), "is a directory")
    assert_refused(edit(tmp_path / "nope.json", tmp_path / "out", llama_dir), EXIT_INPUT, "nope.json",
                   "no such file")


def test_unreachable_hub_dataset(tmp_path, llama_dir, monkeypatch, no_model_load):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nosuch/facts' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert_refused(edit("hf:nosuch/facts", tmp_path / "out", llama_dir), EXIT_INPUT, "hf:nosuch/facts[train]",
                   "could not load the Hub dataset", "Couldn't reach")


def test_skip_invalid_edits_the_rest_and_reports_the_skipped(tmp_path, llama_dir):
    path = _write(tmp_path / "facts.jsonl", "\n".join(json.dumps(r) for r in [
        fact(), fact(), fact(prompt="The capital of Spain is", subject="Spain", target="Madrid",
                             target_true="Madrid")]))
    result = edit(path, tmp_path / "out", llama_dir, "--skip-invalid", "--no-eval", "--save", "none")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["edits"]) == 1
    assert [(s["index"], s["field"]) for s in manifest["data"]["skipped"]] == [(1, None), (2, "target")]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_files_with_a_byte_order_mark_load(tmp_path, llama_dir, data_dir, encoding):
    records = json.loads((data_dir / ROME_FIXTURE).read_text())[:2]
    path = tmp_path / "cf.json"
    path.write_bytes(json.dumps(records, ensure_ascii=False).encode(encoding))
    if encoding != "utf-8-sig":
        assert path.read_bytes().startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF32_LE))
    result = invoke("eval", "--data", path, "--model", llama_dir, "--no-progress", "--device", "cpu",
                    "--out", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["data"]["n_requests"] == 2


# ---------------------------------------------------------------------------------------------- options, configs

def test_bad_options_and_configs_are_refused_before_loading_the_model(tmp_path, llama_dir, data_dir, no_model_load):
    data, out = data_dir / ROME_FIXTURE, tmp_path / "out"
    bad_yaml = _write(tmp_path / "bad.yaml", "train:\n  lr: [1e-4\n")
    utf16_yaml = tmp_path / "u16.yaml"
    utf16_yaml.write_bytes("train:\n  epochs: 0\n".encode("utf-16"))
    cases = [
        (["--n", "0"], ["--n 0", "at least 1"]),
        (["--offset=-1"], ["--offset -1"]),
        (["--set", "train.lr=-1"], ["train.lr", "> 0", "-1"]),
        (["--set", "train.lr=nan"], ["train.lr", "nan"]),
        (["--set", "train.epochs=0"], ["train.epochs", "at least 1"]),
        (["--set", "train.batch_size=0"], ["train.batch_size"]),
        (["--set", "train.optimizer=lion"], ["train.optimizer", "lion"]),
        (["--set", "augment.temperature=0"], ["augment", "temperature"]),
        (["--set", "nosuch.key=1"], ["unknown config field 'nosuch'"]),
        (["--set", "train.epochs=many"], ["train.epochs", "expected a int", "many"]),
        (["--set", "train.lr"], ["expected key=value"]),
        (["--config", bad_yaml], ["bad.yaml", "not valid YAML"]),
        (["--config", tmp_path / "none.yaml"], ["none.yaml", "no such file"]),
        (["--config", utf16_yaml], ["train.epochs", "at least 1"]),  # UTF-16 config read, then validated
        (["--recipe", "nosuch"], ["unknown", "'nosuch'"]),
        (["--layers", "abc"], ["params.layers 'abc'"]),
        (["--recipe", "memit", "--set", "nosuch=1"], ["unknown config field 'nosuch'"]),
        (["--recipe", "rome", "--save", "adapter"], ["--save adapter", "rome"]),
        (["--recipe", "rome", "--resume"], ["--resume", "rome"]),
        (["--set", "params.modules=down,ffn"], ["unknown module 'ffn'"]),
        (["--save", "adapter"], ["--save adapter", "params.method=lora"]),
        (["--save", "everything"], ["--save 'everything'"]),
        (["--dtype", "int3"], ["unknown dtype 'int3'"]),
        (["--device", "gpu0"], ["--device 'gpu0'"]),
        (["--on-conflict", "shrug"], ["--on-conflict 'shrug'"]),
        (["--recipe", "ft-mask-para-rand"], ["--pool"]),
        (["--recipe", "locft-bf", "--pool", tmp_path], ["is a directory"]),
    ]
    for extra, needles in cases:
        result = invoke("edit", "--data", data, "--out", out, "--model", llama_dir, "--recipe", "locft-bf",
                        "--no-progress", *extra)
        assert_refused(result, EXIT_INPUT, *needles)
    assert not out.exists()


def test_bad_model_specs(tmp_path, data_dir, no_model_load):
    data, out = data_dir / ROME_FIXTURE, tmp_path / "out"
    corrupt = _write(tmp_path / "model.gguf", b"GGUF" + b"\xff" * 60)
    not_gguf = _write(tmp_path / "other.gguf", "just text\n")
    (tmp_path / "no_config").mkdir()
    cases = [
        (corrupt, ["model.gguf", "not a valid GGUF file"]),
        (not_gguf, ["other.gguf", "not a valid GGUF file"]),
        (tmp_path / "missing.gguf", ["missing.gguf", "no such file or directory"]),
        ("./models/mine", ["models/mine", "no such file or directory"]),
        (str(tmp_path / "models" / "mine"), ["no such file or directory"]),
        ("~/no/such/model", ["no such file or directory"]),
        (tmp_path / "no_config", ["no config.json"]),
    ]
    for model, needles in cases:
        assert_refused(invoke("edit", "--data", data, "--out", out, "--model", model, "--recipe", "locft-bf"),
                       EXIT_MODEL, *needles)
    result = invoke("eval", "--data", data, "--model", corrupt)
    assert_refused(result, EXIT_MODEL, "not a valid GGUF file")


def test_eval_refusals(tmp_path, llama_dir, data_dir):
    data = data_dir / ROME_FIXTURE
    assert_refused(invoke("eval", "--data", _write(tmp_path / "e.json", "[]"), "--model", llama_dir), EXIT_INPUT,
                   "e.json", "holds no edit requests")
    assert_refused(invoke("eval", "--data", data, "--model", llama_dir, "--out", tmp_path), EXIT_OUTPUT,
                   "is a directory")
    assert_refused(invoke("eval", "--data", data, "--model", llama_dir, "--n", "0"), EXIT_INPUT, "--n 0")
    assert_refused(invoke("eval", "--data", data, "--model", llama_dir, "--missing", "skip"), EXIT_INPUT,
                   "missing='skip'")
    assert_refused(invoke("eval", "--data", data, "--model", llama_dir, "--protocol", "mmlu"), EXIT_INPUT,
                   "--protocol 'mmlu'")


# ---------------------------------------------------------------------------------------------- output folders

def _user_dir(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("my own notes")
    return path


def test_users_files_in_out_are_never_deleted(tmp_path, llama_dir, data_dir, no_model_load):
    data, out = data_dir / ROME_FIXTURE, _user_dir(tmp_path / "mine")
    for flag in ("--resume", "--overwrite", None):
        result = edit(data, out, llama_dir, *([flag] if flag else []))
        assert_refused(result, EXIT_OUTPUT, str(out), "ftedit did not write", "notes.txt")
        assert (out / "notes.txt").read_text() == "my own notes"
    # a finished edit plus a user's file: --overwrite would delete the file, so it is refused too
    (out / "manifest.json").write_text(json.dumps({"ftedit_version": "0.1.0"}))
    assert_refused(edit(data, out, llama_dir, "--overwrite"), EXIT_OUTPUT, "notes.txt")
    assert (out / "notes.txt").exists()


def test_out_that_cannot_be_written(tmp_path, llama_dir, data_dir, no_model_load):
    data = data_dir / ROME_FIXTURE
    a_file = _write(tmp_path / "file.txt", "x")
    assert_refused(edit(data, a_file, llama_dir), EXIT_OUTPUT, "file.txt", "is a file")
    assert_refused(edit(data, a_file / "out", llama_dir), EXIT_OUTPUT, "file.txt", "not a directory")
    if os.geteuid() == 0:  # root writes into read-only folders; sysfs refuses even root
        read_only = Path("/sys/ftedit-test-out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        read_only = locked / "out"
    assert_refused(edit(data, read_only, llama_dir), EXIT_OUTPUT, "not writable")


def test_prepare_output_dir_rules(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_output_dir(empty) == empty and prepare_output_dir(tmp_path / "new") == tmp_path / "new"
    finished = tmp_path / "finished"
    (finished / "model").mkdir(parents=True)
    (finished / "manifest.json").write_text(json.dumps({"ftedit_version": "0.1.0"}))
    with pytest.raises(FileExistsError, match="finished edit"):
        prepare_output_dir(finished)
    assert prepare_output_dir(finished, overwrite=True) == finished
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoint").mkdir(parents=True)
    (interrupted / "checkpoint" / "state.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="interrupted edit") as err:
        prepare_output_dir(interrupted)
    assert "--resume" in err.value.hint
    assert prepare_output_dir(interrupted, resume=True) == interrupted
    foreign_manifest = tmp_path / "foreign"
    foreign_manifest.mkdir()
    (foreign_manifest / "manifest.json").write_text("{}")  # not written by ftedit
    with pytest.raises(FileExistsError, match="did not write"):
        prepare_output_dir(foreign_manifest, overwrite=True)


def test_csv_with_quotes_and_newlines_and_no_paraphrases_edits_and_evaluates(tmp_path, llama_dir):
    """Also: leftover temp folders of an interrupted save are removed, and the result gets the umask's mode."""
    path = tmp_path / "facts.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "subject", "target", "target_true"])
        writer.writerow(['Q: Where is "Le Louvre"?\nA: "Le Louvre" is in', '"Le Louvre"', "Rome", "Paris"])
        writer.writerow(["The Eiffel Tower, in short, is in", "Eiffel Tower", "Berlin", "Paris"])
    out = tmp_path / "out"
    stale = tmp_path / "out.tmp-abc123"  # what a save killed half-way leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (stale / PARTIAL_MARKER).touch()
    users = tmp_path / "out.tmp-mine"  # the same name pattern, but not ftedit's: kept
    users.mkdir()
    old = os.umask(0o022)
    try:
        result = edit(path, out, llama_dir)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and [p.name for p in tmp_path.glob("out.tmp-*")] == ["out.tmp-mine"]
    assert not (out / PARTIAL_MARKER).exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    post = json.loads((out / "manifest.json").read_text())["evaluation"]["post"]
    assert post["n_records"] == 2 and post["n_records_generalization"] == 0 and post["generalization"] is None
    assert post["efficacy"] is not None and "n/a" in result.output


# ---------------------------------------------------------------------------------------------- unexpected errors

def test_an_unexpected_error_keeps_its_traceback_and_asks_for_a_report(tmp_path, llama_dir, data_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(ftedit.pipeline, "load_requests", broken)
    result = edit(data_dir / ROME_FIXTURE, tmp_path / "out", llama_dir)
    assert result.exit_code == EXIT_BUG
    assert "Traceback" in result.output and "ZeroDivisionError: a bug" in result.output
    assert "please report it" in result.output


def test_a_full_disk_is_reported_without_a_traceback(tmp_path, llama_dir, data_dir, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))
    monkeypatch.setattr(ftedit.pipeline, "load_requests", full)
    assert_refused(edit(data_dir / ROME_FIXTURE, tmp_path / "out", llama_dir), EXIT_OUTPUT,
                   "No space left on device", str(tmp_path / "out"))


def test_verbose_shows_the_traceback_of_a_domain_error(tmp_path, llama_dir, no_model_load):
    path = _write(tmp_path / "e.json", "[]")
    result = invoke("-v", "edit", "--data", path, "--out", tmp_path / "out", "--model", llama_dir,
                    "--recipe", "locft-bf")
    assert result.exit_code == EXIT_INPUT and "Traceback" in result.output and "holds no edit requests" in result.output


# ---------------------------------------------------------------------------------------------- Ctrl-C

ROOT = Path(__file__).resolve().parents[1]
SLOW_STEPS = """
import os, signal, sys, time
from pathlib import Path
# a suite started in the background (sh's `cmd &`) passes SIGINT on as ignored: what a user's Ctrl-C meets is
# Python's own handler
signal.signal(signal.SIGINT, signal.default_int_handler)
from ftedit.train import Stepper
accumulate, taken = Stepper.accumulate, []
def step(self, *args, **kwargs):
    taken.append(1)
    if len(taken) == 3:
        Path(os.environ["STARTED"]).touch()
    time.sleep(0.05)
    return accumulate(self, *args, **kwargs)
Stepper.accumulate = step
from ftedit.commands import main
sys.argv = ["ftedit"] + sys.argv[1:]
main()
"""


def _interrupt(tmp_path, args, ready: Path) -> subprocess.CompletedProcess:
    """Run ``ftedit args`` in a process, send it SIGINT once ``ready`` exists, and return its result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "STARTED": str(tmp_path / "started"),
           "FTEDIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_ctrl_c_keeps_the_checkpoint_and_prints_the_command_that_resumes(tmp_path, llama_dir, data_dir):
    out = tmp_path / "out"
    args = ["edit", "--data", data_dir / ROME_FIXTURE, "--out", out, "--model", llama_dir, "--recipe", "locft-bf",
            "--no-progress", "--no-eval", "--set", "train.epochs=200", "--set", "train.batch_size=2",
            "--set", "train.checkpoint_every=2", "--set", "params.layers=-1"]
    done = _interrupt(tmp_path, args, out / "checkpoint" / "state.pt")
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "training progress is saved in" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"] and not list(tmp_path.glob("out.tmp-*"))
    command = shlex.split(done.stderr.split("continue with: ", 1)[1].splitlines()[0])
    assert command == ["ftedit", *map(str, args), "--resume"]
    assert prepare_output_dir(out, resume=True) == out  # the folder is one --resume continues


def test_ctrl_c_before_any_checkpoint_leaves_no_output(tmp_path, llama_dir, data_dir):
    out = tmp_path / "out"
    args = ["edit", "--data", data_dir / ROME_FIXTURE, "--out", out, "--model", llama_dir, "--recipe", "locft-bf",
            "--no-progress", "--set", "train.epochs=200", "--set", "params.layers=-1"]
    done = _interrupt(tmp_path, args, tmp_path / "started")
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "nothing was saved" in done.stderr and "start over with: ftedit" in done.stderr
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.parametrize("command, target", [
    (["eval", "--data", "edits.json", "--out", "scores.json"], "ftedit.evaluate.run.run_evaluation"),
    (["locate", "--data", "edits.json", "--out", "sweep"], "ftedit.locate.run_sweeps"),
])
def test_ctrl_c_in_eval_and_locate_says_what_was_kept(command, target, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    done = CliRunner().invoke(app, command)
    assert done.exit_code == 130, done.output
    assert "did not finish" in done.output and "run the same command" in done.output
