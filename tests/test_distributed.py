"""The same `ftedit edit` under a 2-process launcher (gloo on CPU) ends at the single-process weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftedit.commands import app

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_cpu_processes_train_like_one(tmp_path, llama_model, llama_tok, data_dir, fsdp):
    base = tmp_path / "base"
    llama_model.save_pretrained(base)
    llama_tok.save_pretrained(base)
    # 5 edits in micro-batches of 2: the last batch has one example, so one process gets none
    args = ["edit", "--model", str(base), "--data", str(data_dir / "fixtures/counterfact_rome_format_first5.json"),
            "--recipe", "locft-bf", "--no-progress", "--set", "train.epochs=4",
            "--set", "train.batch_size=2", "--set", "train.lr=1e-2", "--set", "params.layers=-2:"]
    single = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo", "FTEDIT_CACHE": str(tmp_path / "cache")}
    if fsdp:  # each process holds half of every weight (FSDP2 shards), gathered per block
        env["ACCELERATE_USE_FSDP"] = "true"
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "ftedit", *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert ("FSDP: 3 decoder blocks and the root sharded" in launched.stderr) == fsdp

    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    changed = [k for k in one if not torch.equal(one[k], load_file(base / "model.safetensors")[k])]
    assert changed, "the edit changed nothing"
    for k in one:  # gradients summed across processes: equal up to float summation order
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
    evaluation = json.loads((tmp_path / "two" / "manifest.json").read_text())["evaluation"]
    assert evaluation["post"]["efficacy"] == json.loads((tmp_path / "one" / "manifest.json").read_text())[
        "evaluation"]["post"]["efficacy"]


def test_quantized_base_weights_need_cuda_and_lora(tmp_path, llama_model, llama_tok, data_dir):
    import pytest

    from ftedit.config import resolve_config
    from ftedit.data import load_requests
    from ftedit.editor import edit
    from ftedit.models import ModelLoadError, load_model

    base = tmp_path / "base"
    llama_model.save_pretrained(base)
    llama_tok.save_pretrained(base)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA"):
            load_model(str(base), device="cpu", quantize="4bit")
    refused = CliRunner().invoke(app, ["edit", "--model", str(base), "--data",
                                       str(data_dir / "fixtures/counterfact_rome_format_first5.json"),
                                       "--out", str(tmp_path / "q"), "--quantize", "4bit"])
    assert refused.exit_code != 0 and "LoRA" in str(refused.exception)
    llama_model.hf_quantizer = object()  # what a bitsandbytes load leaves on the model
    requests = load_requests(data_dir / "fixtures/counterfact_rome_format_first5.json").requests
    with pytest.raises(ValueError, match="quantized"):
        edit(llama_model, llama_tok, requests, resolve_config("locft-bf", overrides=["params.layers=1"]),
             progress=False)


def test_device_auto_places_the_model_with_a_device_map(tmp_path, llama_model, llama_tok):
    from ftedit.models import load_model

    llama_model.save_pretrained(tmp_path)
    llama_tok.save_pretrained(tmp_path)
    model, _, identity = load_model(str(tmp_path), device="auto")
    assert identity.extra["device_map"] == "auto"
    expected = llama_model.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight.cpu(), expected)
