"""Resumable training: a run interrupted after step k and resumed ends with exactly the uninterrupted weights."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftedit.checkpoint import CheckpointError, Checkpoints, run_fingerprint
from ftedit.commands import app
from ftedit.config import resolve_config
from ftedit.data import load_requests
from ftedit.editor import edit
from ftedit.train import Stepper

ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    pass


def _requests(data_dir):
    return load_requests(data_dir / "fixtures/counterfact_rome_format_first5.json").requests


def _config(**train):
    over = {"params": {"layers": "-2:", "modules": "mlp"}, "augment": {"n_paraphrases": 0},
            "train": {"epochs": 4, "batch_size": 2, "lr": 1e-2, **train}}
    return resolve_config("locft-bf", overrides=over)


def _trainable(result) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result._attached.params.items()}


def _interrupt_after(monkeypatch, k: int) -> list[int]:
    """Make the k-th optimizer step raise, as a crash would; returns the list of steps taken."""
    taken: list[int] = []
    accumulate = Stepper.accumulate

    def step(self, *args, **kwargs):
        if len(taken) == k:
            raise Interrupted(f"after step {k}")
        taken.append(k)
        return accumulate(self, *args, **kwargs)

    monkeypatch.setattr(Stepper, "accumulate", step)
    return taken


@pytest.mark.parametrize("variant", [
    {"mode": "mass"},
    {"mode": "mass", "train": {"group_by_length": True, "grad_accum": 2}},
    {"mode": "sequential", "sequential_batch": 3},
    {"mode": "mass", "train": {"pipeline": "depth", "steps_per_edit": 3, "checkpoint_every": 2}},
])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch, llama_model, llama_tok, data_dir,
                                                       variant):
    requests = _requests(data_dir)
    cfg = _config(**{"checkpoint_every": 3, **variant.get("train", {})})
    cfg.mode = variant["mode"]
    cfg.sequential_batch = variant.get("sequential_batch", cfg.sequential_batch)
    fingerprint = run_fingerprint(cfg.to_dict(), [r.prompt for r in requests], "tiny")

    reference = edit(copy.deepcopy(llama_model), llama_tok, requests, cfg, progress=False)
    total_steps = sum(r.steps for r in reference.train)

    with monkeypatch.context() as m:
        _interrupt_after(m, 7)
        with pytest.raises(Interrupted):
            edit(copy.deepcopy(llama_model), llama_tok, requests, cfg, progress=False,
                 checkpoints=Checkpoints(tmp_path, fingerprint, cfg.train.checkpoint_every))
    assert (tmp_path / "state.pt").is_file()

    with monkeypatch.context() as m:
        resumed_steps = _interrupt_after(m, 10_000)
        resumed = edit(copy.deepcopy(llama_model), llama_tok, requests, cfg, progress=False,
                       checkpoints=Checkpoints(tmp_path, fingerprint, cfg.train.checkpoint_every, resume=True))
    # it continued from the checkpoint (step 6 or an edit boundary before step 7), not from the start
    assert 0 < len(resumed_steps) < total_steps
    assert len(resumed_steps) >= total_steps - 7
    expected, got = _trainable(reference), _trainable(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert [vars(r) | {"seconds": 0} for r in resumed.train] == [vars(r) | {"seconds": 0} for r in reference.train]
    assert not all(torch.equal(expected[n], p) for n, p in reference._attached.initial.items())


def test_a_checkpoint_of_another_edit_is_refused(tmp_path, llama_model, llama_tok, data_dir):
    requests = _requests(data_dir)
    cfg = _config(epochs=1)
    edit(copy.deepcopy(llama_model), llama_tok, requests, cfg, progress=False,
         checkpoints=Checkpoints(tmp_path, "fingerprint-a", 1))
    with pytest.raises(CheckpointError, match="different edit"):
        Checkpoints(tmp_path, "fingerprint-b", 1, resume=True)
    (tmp_path / "state.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="state.pt"):
        Checkpoints(tmp_path, "fingerprint-a", 1, resume=True)


KILLER = """
import os, signal, sys
from ftedit.train import Stepper
accumulate, taken = Stepper.accumulate, []
def step(self, *args, **kwargs):
    if len(taken) == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handler: a hard crash
    taken.append(1)
    return accumulate(self, *args, **kwargs)
Stepper.accumulate = step
from ftedit.commands import app
sys.argv = ["ftedit"] + sys.argv[1:]
app()
"""


def test_cli_run_killed_with_sigkill_resumes_to_the_uninterrupted_model(tmp_path, llama_model, llama_tok, data_dir):
    base = tmp_path / "base"
    llama_model.save_pretrained(base)
    llama_tok.save_pretrained(base)
    args = ["edit", "--model", str(base), "--data", str(data_dir / "fixtures/counterfact_rome_format_first5.json"),
            "--recipe", "locft-bf", "--no-eval", "--no-progress", "--set", "train.epochs=5",
            "--set", "train.batch_size=2", "--set", "train.lr=1e-2", "--set", "params.layers=-2:",
            "--set", "train.checkpoint_every=2"]
    ok = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "straight")])
    assert ok.exit_code == 0, ok.output

    out = tmp_path / "killed"
    env = {**os.environ, "KILL_AFTER": "9", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "FTEDIT_CACHE": str(tmp_path / "cache")}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args, "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "checkpoint" / "state.pt").is_file() and not (out / "manifest.json").exists()

    refused = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert refused.exit_code != 0 and "--resume" in str(refused.exception)
    resumed = CliRunner().invoke(app, [*args, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    again = load_file(out / "model" / "model.safetensors")
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"][0]["steps"] == 15 and not (out / "checkpoint").exists()

