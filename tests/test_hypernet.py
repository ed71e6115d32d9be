"""MEND and MALMEN: the gradient factorisation, the normal-equation solve, editor storage, resumable training
and a brief training run on tiny models."""

import json

import pytest
import torch

from ftedit.baselines.hypernet import (
    Hypernet,
    NetConfig,
    Prefix,
    edit_factors,
    edited_targets,
    normal_equation_shift,
)
from ftedit.baselines.hypernet_train import (
    EditorMissingError,
    editor_path,
    load_editor,
    request_factors,
    save_editor,
    step_loss,
    train_editor,
)
from ftedit.baselines.malmen import MALMENHyperParams, malmen_shifts
from ftedit.baselines.mend import MENDHyperParams, mend_shifts
from ftedit.data.loaders import load_requests
from ftedit.data.requests import EditRequest
from ftedit.forward import per_example_nll
from ftedit.methods import apply_method
from ftedit.params import is_conv1d, weight_out_in
from ftedit.tokenization import encode_pair, pad_right

REQUESTS = [
    EditRequest(prompt="The capital of France is", subject="France", target_new="Rome", target_true="Paris"),
    EditRequest(prompt="The quick brown fox jumps over the", subject="brown fox", target_new="Paris dog",
                target_true="dog"),
]


@pytest.fixture
def train_file(tmp_path, data_dir):
    """The first 24 records of COUNTERFACT's training split (EasyEdit schema)."""
    records = json.loads((data_dir / "counterfact" / "easyedit" / "counterfact-train.json").read_text())[:24]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path


def _hparams(cls, train_file, **train):
    hp = cls()
    hp.net = NetConfig(layers="-2:", modules="down,up", rank=8, init_lr=1e-3)
    hp.train.data, hp.train.n_records, hp.train.batch_size = str(train_file), 24, 2
    hp.train.lr, hp.train.lr_lr = 1e-4, 5e-2
    for key, value in train.items():
        setattr(hp.train, key, value)
    return hp


def _batch(tok, requests=REQUESTS):
    return pad_right([encode_pair(tok, r.prompt, r.target_new) for r in requests], tok.pad_token_id)


# ------------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rank_one_factors_sum_to_the_weight_gradient(arch, request):
    model = request.getfixturevalue(f"{arch}_model")
    tok = request.getfixturevalue(f"{arch}_tok")
    targets = edited_targets(model, NetConfig(layers="-2:", modules="down,up"))
    batch = _batch(tok)
    prefix = Prefix(model, batch, min(t.layer for t in targets))
    sub, context = prefix.rows(torch.arange(len(REQUESTS)))
    factors = edit_factors(model, targets, sub, context)
    for t in targets:
        t.module.weight.requires_grad_(True)
    nll, _ = per_example_nll(model, batch)
    nll.sum().backward()
    for t, f in zip(targets, factors, strict=True):
        grad = t.module.weight.grad.T if is_conv1d(t.module) else t.module.weight.grad
        assert grad.abs().max() > 0
        torch.testing.assert_close(f.delta.T @ f.u, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [5, 40])  # fewer keys than inputs (the n×n system) and more (the d×d one)
def test_normal_equation_shift_is_the_ridge_least_squares_solution(n):
    g = torch.Generator().manual_seed(n)
    d_in, d_out, lam = 12, 7, 0.3
    keys = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    values = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    shift = normal_equation_shift(keys, values, lam)
    # ridge regression as an ordinary least-squares problem: [U; √λ I] Sᵀ = [D; 0]
    a = torch.cat([keys, lam ** 0.5 * torch.eye(d_in, dtype=torch.float64)])
    b = torch.cat([values, torch.zeros(d_in, d_out, dtype=torch.float64)])
    torch.testing.assert_close(shift, torch.linalg.lstsq(a, b).solution.T)
    closed = values.T @ keys @ torch.linalg.inv(keys.T @ keys + lam * torch.eye(d_in, dtype=torch.float64))
    torch.testing.assert_close(shift, closed)


def test_normal_equation_shift_is_differentiable():
    keys = torch.randn(6, 4, dtype=torch.float64)
    values = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: normal_equation_shift(keys, v, 0.5), (values,))


def test_a_fresh_generator_passes_the_rms_normalized_factors_through():
    net = Hypernet([(4, 3)], NetConfig(rank=2))
    u, delta = torch.randn(10, 4), torch.randn(10, 3)
    net.observe(0, u, delta)
    u_t, d_t = net.transform(0, u, delta)
    torch.testing.assert_close(u_t, u / u.pow(2).mean(0).sqrt())
    torch.testing.assert_close(d_t, delta / delta.pow(2).mean(0).sqrt())
    net.observe(0, 3 * u, 3 * delta)  # statistics accumulate over batches
    torch.testing.assert_close(net.transform(0, u, delta)[0], u / (5 * u.pow(2).mean(0)).sqrt())


# ------------------------------------------------------------------------------------------ storage and training


def _perturbed(net: Hypernet) -> Hypernet:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("cls,rule", [(MENDHyperParams, mend_shifts), (MALMENHyperParams, malmen_shifts)])
def test_saved_editor_loads_with_identical_shifts(tmp_path, llama_model, llama_tok, train_file, cls, rule):
    hp = _hparams(cls, train_file)
    targets = edited_targets(llama_model, hp.net)
    factors = request_factors(llama_model, llama_tok, targets, REQUESTS)
    net = Hypernet([tuple(weight_out_in(t.module).shape[::-1]) for t in targets], hp.net)
    for i, f in enumerate(factors):
        net.observe(i, f.u, f.delta)
    _perturbed(net)
    path = save_editor(tmp_path / "e.safetensors", net, "mend" if cls is MENDHyperParams else "malmen", "fp", hp,
                       targets, 3)
    loaded = load_editor(path, "mend" if cls is MENDHyperParams else "malmen", targets, hp.net)
    with torch.no_grad():
        for a, b in zip(rule(net, factors, hp), rule(loaded, factors, hp), strict=True):
            assert a.dense().abs().max() > 0
            assert torch.equal(a.dense(), b.dense())


def test_load_editor_refuses_another_method(tmp_path, llama_model, train_file):
    hp = _hparams(MENDHyperParams, train_file)
    targets = edited_targets(llama_model, hp.net)
    net = Hypernet([tuple(weight_out_in(t.module).shape[::-1]) for t in targets], hp.net)
    path = save_editor(tmp_path / "e.safetensors", net, "mend", "fp", hp, targets, 0)
    with pytest.raises(Exception, match="not a malmen editor"):
        load_editor(path, "malmen", targets, hp.net)


@pytest.mark.parametrize("cls,rule", [(MENDHyperParams, mend_shifts), (MALMENHyperParams, malmen_shifts)])
def test_resumed_training_ends_in_the_uninterrupted_state(tmp_path, llama_model, llama_tok, train_file, cls, rule):
    hp = _hparams(cls, train_file, steps=4, checkpoint_every=2)
    whole = train_editor(llama_model, llama_tok, "m", rule, hp, checkpoint=tmp_path / "a.pt", progress=False)
    first = train_editor(llama_model, llama_tok, "m", rule, hp, checkpoint=tmp_path / "b.pt", stop_after=2,
                         progress=False)
    resumed = train_editor(llama_model, llama_tok, "m", rule, hp, checkpoint=tmp_path / "b.pt", resume=True,
                           progress=False)
    assert first.steps == 2 and len(resumed.history) == 2 and resumed.steps == 4
    expected, got = whole.net.state_dict(), resumed.net.state_dict()
    assert any(not torch.equal(expected[k], first.net.state_dict()[k]) for k in expected)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, llama_model, llama_tok, train_file):
    hp = _hparams(MENDHyperParams, train_file, steps=2, checkpoint_every=1)
    train_editor(llama_model, llama_tok, "mend", mend_shifts, hp, checkpoint=tmp_path / "c.pt", stop_after=1,
                 progress=False)
    hp.train.lr = 0.5
    with pytest.raises(Exception, match="checkpoint of another editor"):
        train_editor(llama_model, llama_tok, "mend", mend_shifts, hp, checkpoint=tmp_path / "c.pt", resume=True,
                     progress=False)


@pytest.mark.parametrize("cls,rule", [(MENDHyperParams, mend_shifts), (MALMENHyperParams, malmen_shifts)])
def test_brief_training_lowers_the_edit_loss(tmp_path, llama_model, llama_tok, train_file, cls, rule):
    with torch.no_grad():  # a random init predicts nearly uniformly: no edit could make it confident
        llama_model.lm_head.weight.mul_(30)
    hp = _hparams(cls, train_file, steps=80)
    trained = train_editor(llama_model, llama_tok, "m", rule, hp, checkpoint=tmp_path / "c.pt", progress=False)
    losses = torch.tensor([h["loss"] for h in trained.history])
    assert losses[-20:].mean() < losses[:20].mean() - 1
    held = load_requests(train_file, offset=20, n=2).requests  # records the 80 steps saw least
    targets = edited_targets(llama_model, hp.net)
    _, edited = step_loss(llama_model, llama_tok, targets, trained.net, rule, hp, held, observe=False)
    unedited, _ = per_example_nll(llama_model, _batch(llama_tok, held))
    assert edited["edit_nll"] < unedited.mean().item() - 2


# ------------------------------------------------------------------------------------------ the registry


def test_mend_without_a_trained_editor_says_how_to_train_one(llama_model, llama_tok):
    with pytest.raises(EditorMissingError, match="ftedit train-editor --method mend"):
        apply_method("mend", llama_model, llama_tok, REQUESTS, progress=False)


@pytest.mark.parametrize("method,cls", [("mend", MENDHyperParams), ("malmen", MALMENHyperParams)])
def test_trained_editor_in_the_cache_edits_through_the_registry(llama_model, llama_tok, train_file, method, cls):
    from ftedit.baselines.editors import train_and_save
    from ftedit.cache import model_fingerprint

    hp = _hparams(cls, train_file, steps=3)
    run = train_and_save(method, llama_model, llama_tok, hp, progress=False)
    assert run.editor == editor_path(method, model_fingerprint(llama_model), hp)
    before = {t.name: t.module.weight.detach().clone() for t in run.trained.targets}
    overrides = {"net": vars(hp.net), "train": vars(hp.train)}
    applied = apply_method(method, llama_model, llama_tok, REQUESTS, overrides=overrides, progress=False)
    assert {t.name for t in applied.touched} == set(before)
    assert any(not torch.equal(before[t.name], t.module.weight) for t in run.trained.targets)
    applied.restore()
    assert all(torch.equal(before[t.name], t.module.weight) for t in run.trained.targets)


# ------------------------------------------------------------------------------------------ the command line


def test_cli_trains_resumes_and_edits_with_the_cached_editor(tmp_path, llama_dir, train_file, data_dir):
    from typer.testing import CliRunner

    from ftedit.commands import app

    settings = ["--set", f"train.data={train_file}", "--set", "train.n_records=24", "--set", "train.steps=4",
                "--set", "train.checkpoint_every=1", "--set", "net.layers=-2:", "--set", "net.rank=4"]
    train = ["train-editor", "--method", "mend", "--model", str(llama_dir), "--device", "cpu", "--no-progress",
             *settings]
    stopped = CliRunner().invoke(app, [*train, "--stop-after", "2"])
    assert stopped.exit_code == 0, stopped.output
    assert "--resume" in stopped.output
    finished = CliRunner().invoke(app, [*train, "--resume"])
    assert finished.exit_code == 0, finished.output
    assert "4/4 steps" in finished.output and ".safetensors" in finished.output
    out = tmp_path / "edited"
    edit = CliRunner().invoke(app, ["edit", "--model", str(llama_dir), "--device", "cpu", "--recipe", "mend",
                                    "--data", str(data_dir / "fixtures/counterfact_rome_format_first5.json"),
                                    "--out", str(out), "--save", "none", "--no-progress", *settings])
    assert edit.exit_code == 0, edit.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "mend" and manifest["touched"]["layers"] == [1, 2]
    missing = CliRunner().invoke(app, ["edit", "--model", str(llama_dir), "--device", "cpu", "--recipe", "malmen",
                                       "--data", str(data_dir / "fixtures/counterfact_rome_format_first5.json"),
                                       "--out", str(tmp_path / "m"), "--save", "none", "--no-progress"])
    assert missing.exit_code != 0 and "ftedit train-editor --method malmen" in missing.output
