"""Training, storing and applying the hypernetwork editors (MEND, MALMEN).

Training (:func:`train_editor`) meta-learns the shift generator on a training split (COUNTERFACT's
``counterfact-train.json``, never the edit split): each step takes ``batch_size`` edits, computes their
gradient factors on the unedited model, turns them into weight shifts, and minimizes
``edit_weight · NLL(target | edit prompt and its rephrase, shifted model)
+ loc_weight · KL(unedited || shifted)`` at an unrelated (locality) prompt's answer tokens.

The batch order is a function of the seed and the step, so a checkpoint (generator, optimizer, step) resumes
exactly where an uninterrupted run would be. A trained editor is a safetensors file whose metadata names the
method, the model fingerprint, the settings and the edited weights; by default it lives in ftedit's cache,
keyed by the model fingerprint and the settings (:func:`editor_path`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn
from tqdm.auto import tqdm

from ftedit.atomic import write_bytes_atomic
from ftedit.baselines.common import BaselineError, Snapshot, add_update
from ftedit.baselines.hypernet import (
    Factors,
    Hypernet,
    NetConfig,
    Prefix,
    Shift,
    edit_factors,
    edited_targets,
    shifted,
    target_shape,
)
from ftedit.cache import cache_path, model_fingerprint
from ftedit.data.loaders import load_requests
from ftedit.data.requests import EditRequest
from ftedit.forward import apply_head, body_hidden, label_positions, lm_parts, model_device
from ftedit.params import Target
from ftedit.tokenization import encode_pair, pad_right

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_DATA = "../shared/data/counterfact/easyedit/counterfact-train.json"  # relative to the working dir
FORMAT = "ftedit-hypernet-editor"
CHECKPOINT_VERSION = 1

# shifts(net, factors, hparams) -> one Shift per edited weight
ShiftRule = Callable[[Hypernet, Sequence[Factors], Any], list[Shift]]


@dataclass
class TrainConfig:
    """How the editor is meta-trained (MEND: batches of 10 edits, Adam lr 1e-6, tens of thousands of steps)."""

    data: str = DEFAULT_TRAIN_DATA  # training edits with rephrase and locality prompts (EasyEdit schema)
    n_records: int = 2000  # records of the training file used
    steps: int = 200  # optimizer steps
    batch_size: int = 4  # edits per step
    lr: float = 1e-4  # Adam on the generator
    lr_lr: float = 1e-2  # Adam on the log edit step sizes
    edit_weight: float = 1.0  # weight of the edit NLL (MEND: 0.1)
    loc_weight: float = 1.0  # weight of the locality KL
    checkpoint_every: int = 25  # steps between resumable checkpoints
    seed: int = 0  # the batch order


class EditorMissingError(BaselineError):
    """No trained editor for this model and settings."""


# ------------------------------------------------------------------------------------------ keys and files


def settings_of(hparams) -> dict[str, Any]:
    """What a trained editor depends on: every setting except where it is stored and when it checkpoints."""
    settings = dataclasses.asdict(hparams)
    for key in ("editor", "seed"):
        settings.pop(key, None)
    settings["train"].pop("checkpoint_every", None)
    return settings


def editor_path(method: str, fingerprint: str, hparams) -> Path:
    return cache_path("editors", suffix=".safetensors", method=method, model=fingerprint,
                      settings=settings_of(hparams))


def checkpoint_path(method: str, fingerprint: str, hparams) -> Path:
    return cache_path("editor-checkpoints", suffix=".pt", method=method, model=fingerprint,
                      settings=settings_of(hparams))


def save_editor(path: str | Path, net: Hypernet, method: str, fingerprint: str, hparams, targets: Sequence[Target],
                steps: int) -> Path:
    meta = {"format": FORMAT, "method": method, "model": fingerprint, "steps": str(steps),
            "settings": json.dumps(settings_of(hparams), sort_keys=True),
            "targets": json.dumps([t.name for t in targets]), "shapes": json.dumps(net.shapes)}
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    return write_bytes_atomic(path, save_tensors(tensors, metadata=meta))


def load_editor(path: str | Path, method: str, targets: Sequence[Target], net_cfg: NetConfig) -> Hypernet:
    """The editor saved at ``path``, checked against the method and the model's edited weights."""
    path = Path(path)
    if not path.is_file():
        raise EditorMissingError(f"editor {path}: no such file")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or meta.get("method") != method:
        raise BaselineError(f"editor {path}: not a {method} editor (format {meta.get('format')!r}, "
                            f"method {meta.get('method')!r})")
    names, shapes = json.loads(meta["targets"]), [tuple(s) for s in json.loads(meta["shapes"])]
    mine = [target_shape(t) for t in targets]
    if names != [t.name for t in targets] or shapes != mine:
        raise BaselineError(f"editor {path}: trained for weights {names} {shapes}, but net.layers/net.modules "
                            f"select {[t.name for t in targets]} {mine} in this model")
    saved = json.loads(meta["settings"])["net"]
    net = Hypernet(shapes, NetConfig(**saved))
    net.load_state_dict(load_tensors(path.read_bytes()))
    return net


# ------------------------------------------------------------------------------------------ the loss


def _pairs(tok, requests: Sequence[EditRequest]) -> list:
    """Edit pairs, then rephrase pairs, then locality pairs (one of each per request)."""
    for r in requests:
        if not r.paraphrase_prompts or not r.neighborhood:
            raise BaselineError(f"training record {r.origin.file}#{r.origin.index}: needs a rephrase prompt "
                                "and a locality prompt with its answer (rephrase_prompt, locality_prompt)")
    return ([encode_pair(tok, r.prompt, r.target_new) for r in requests]
            + [encode_pair(tok, r.paraphrase_prompts[0], r.target_new) for r in requests]
            + [encode_pair(tok, r.neighborhood[0].prompt, r.neighborhood[0].target) for r in requests])


def _label_logits(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at every labelled position, the row of each, and the labelled tokens."""
    rows, pos, tokens = label_positions(batch.labels)
    parts = lm_parts(model)
    if parts.body is None:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False).logits[rows, pos].float(), rows, tokens
    return apply_head(parts, body_hidden(parts, batch.input_ids, batch.attention_mask)[rows, pos]), rows, tokens


def step_loss(model: nn.Module, tok, targets: Sequence[Target], net: Hypernet, rule: ShiftRule, hparams,
              requests: Sequence[EditRequest], observe: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The meta-training loss of one batch of edits (see the module docstring)."""
    n, device = len(requests), model_device(model)
    prefix = Prefix(model, pad_right(_pairs(tok, requests), tok.pad_token_id).to(device),
                    min(t.layer for t in targets))
    edits, context = prefix.rows(torch.arange(n, device=device))
    factors = edit_factors(model, targets, edits, context)
    if observe:
        for i, f in enumerate(factors):
            net.observe(i, f.u, f.delta)
    everything, context = prefix.rows(torch.arange(3 * n, device=device))
    with torch.no_grad(), context:
        base, base_rows, _ = _label_logits(model, everything)
    shifts = rule(net, factors, hparams)
    _, context = prefix.rows(torch.arange(3 * n, device=device))
    with shifted(targets, shifts), context:
        logits, rows, tokens = _label_logits(model, everything)
    nll_tok = F.cross_entropy(logits, tokens, reduction="none")
    gen = rows < 2 * n
    per_row = torch.zeros(2 * n, device=device).index_add(0, rows[gen], nll_tok[gen])
    counts = torch.zeros(2 * n, device=device).index_add(0, rows[gen], torch.ones_like(nll_tok[gen]))
    edit_nll = (per_row / counts).mean()
    loc = ~gen
    kl = F.kl_div(F.log_softmax(logits[loc], -1), F.log_softmax(base[loc], -1), log_target=True,
                  reduction="batchmean")
    loss = hparams.train.edit_weight * edit_nll + hparams.train.loc_weight * kl
    return loss, {"loss": loss.item(), "edit_nll": edit_nll.item(), "kl": kl.item()}


# ------------------------------------------------------------------------------------------ training


def _batch(requests: Sequence[EditRequest], cfg: TrainConfig, step: int) -> list[EditRequest]:
    """The edits of ``step``: consecutive slices of one seeded permutation per pass over the data."""
    per_pass = max(1, len(requests) // cfg.batch_size)
    epoch, index = divmod(step, per_pass)
    order = torch.randperm(len(requests), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    return [requests[int(i)] for i in order[index * cfg.batch_size:(index + 1) * cfg.batch_size]]


def _optimizer(net: Hypernet, cfg: TrainConfig) -> torch.optim.Optimizer:
    rest = [p for name, p in net.named_parameters() if name != "log_lr"]
    return torch.optim.Adam([{"params": rest, "lr": cfg.lr}, {"params": [net.log_lr], "lr": cfg.lr_lr}])


def _save_checkpoint(path: Path, key: str, step: int, net: Hypernet, opt: torch.optim.Optimizer) -> None:
    buffer = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, "key": key, "step": step, "net": net.state_dict(),
                "optimizer": opt.state_dict()}, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def _resume(path: Path, key: str, net: Hypernet, opt: torch.optim.Optimizer) -> int:
    """Load the checkpoint at ``path`` into ``net`` and ``opt``; the step it was taken after (0: none)."""
    if not path.is_file():
        logger.warning("--resume: no editor checkpoint at %s; starting from step 0", path)
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise BaselineError(f"{path}: not a readable editor checkpoint ({e})") from e
    if state.get("version") != CHECKPOINT_VERSION or state.get("key") != key:
        raise BaselineError(f"{path}: checkpoint of another editor (method, model or settings differ); "
                            "rerun with the original settings or without --resume")
    net.load_state_dict(state["net"])
    opt.load_state_dict(state["optimizer"])
    logger.info("resuming editor training from %s at step %d", path, state["step"])
    return int(state["step"])


@dataclass
class TrainedEditor:
    net: Hypernet
    targets: list[Target]
    steps: int
    history: list[dict[str, float]]


def train_editor(model: nn.Module, tok, method: str, rule: ShiftRule, hparams, *, checkpoint: str | Path,
                 resume: bool = False, stop_after: int | None = None, progress: bool = True) -> TrainedEditor:
    """Meta-train a fresh editor for ``model`` (whose weights stay unchanged), checkpointing to ``checkpoint``.

    ``stop_after``: end after that many steps in total (an interruption, for tests and time limits).
    """
    cfg = hparams.train
    requests = load_requests(cfg.data, n=cfg.n_records).requests
    targets = edited_targets(model, hparams.net)
    torch.manual_seed(cfg.seed)
    net = Hypernet([target_shape(t) for t in targets], hparams.net).to(model_device(model))
    opt = _optimizer(net, cfg)
    key = json.dumps({"method": method, "model": model_fingerprint(model), "settings": settings_of(hparams)},
                     sort_keys=True)
    checkpoint = Path(checkpoint)
    start = _resume(checkpoint, key, net, opt) if resume else 0
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    history = []
    for step in tqdm(range(start, end), desc=f"train {method}", disable=not progress, initial=start, total=end):
        opt.zero_grad()
        loss, info = step_loss(model, tok, targets, net, rule, hparams, _batch(requests, cfg, step))
        loss.backward()
        opt.step()
        history.append({"step": step + 1, **info})
        logger.info("%s step %d/%d: loss %.4f, edit NLL %.4f, KL %.4f", method, step + 1, cfg.steps,
                    info["loss"], info["edit_nll"], info["kl"])
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            _save_checkpoint(checkpoint, key, step + 1, net, opt)
    return TrainedEditor(net, targets, end, history)


# ------------------------------------------------------------------------------------------ applying


def request_factors(model: nn.Module, tok, targets: Sequence[Target], requests: Sequence[EditRequest],
                    batch_size: int = 16) -> list[Factors]:
    """Each target's gradient factors of every request's edit NLL on the unedited model (tokens stacked)."""
    device, first = model_device(model), min(t.layer for t in targets)
    chunks: list[list[Factors]] = []
    for start in range(0, len(requests), batch_size):
        pairs = [encode_pair(tok, r.prompt, r.target_new) for r in requests[start:start + batch_size]]
        prefix = Prefix(model, pad_right(pairs, tok.pad_token_id).to(device), first)
        batch, context = prefix.rows(torch.arange(len(pairs), device=device))
        chunks.append(edit_factors(model, targets, batch, context))
    return [Factors(torch.cat([c[i].u for c in chunks]), torch.cat([c[i].delta for c in chunks]))
            for i in range(len(targets))]


def find_editor(method: str, model: nn.Module, targets: Sequence[Target], hparams) -> Hypernet:
    """The explicit ``hparams.editor``, else the cached editor for this model's weights and these settings
    (keyed by :func:`~ftedit.cache.model_fingerprint`, the weights in memory, however the model was loaded)."""
    if hparams.editor:
        return load_editor(hparams.editor, method, targets, hparams.net)
    path = editor_path(method, model_fingerprint(model), hparams)
    if not path.is_file():
        raise EditorMissingError(
            f"no trained {method} editor for this model and these settings (looked for {path}). Train one with "
            f"`ftedit train-editor --method {method} --model MODEL` (with the same --set options), "
            f"or pass a trained editor with --set editor=PATH")
    return load_editor(path, method, targets, hparams.net)


def apply_hypernet(method: str, rule: ShiftRule, model: nn.Module, tok, requests: Sequence[EditRequest], hparams,
                   fingerprint: str = "", progress: bool = True) -> tuple[Snapshot, list[Target], dict[str, Any]]:
    """Edit ``model`` in place with a trained editor: all requests' shifts, aggregated by ``rule``.
    ``fingerprint`` (the loader's identity of the model) is not used: editors are keyed by the weights."""
    targets = edited_targets(model, hparams.net)
    net = find_editor(method, model, targets, hparams).to(model_device(model))
    factors = request_factors(model, tok, targets, requests)
    with torch.no_grad():
        updates = [s.dense() for s in rule(net, factors, hparams)]
    snapshot = Snapshot(model)
    for t, update in zip(targets, updates, strict=True):
        snapshot.keep(t)
        add_update(t.module, update)
    log = {"update_norms": {t.name: u.norm().item() for t, u in zip(targets, updates, strict=True)},
           "tokens": int(factors[0].u.shape[0])}
    logger.info("%s: %d edits, %d tokens, update norms %s", method, len(requests), log["tokens"],
                {k: round(v, 4) for k, v in log["update_norms"].items()})
    return snapshot, targets, log
