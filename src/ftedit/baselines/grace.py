"""GRACE (Hartvigsen et al. 2023, "Aging with GRACE"): a discrete key-value codebook at one layer, for
sequential edits. The weights are never changed.

A codebook entry is a key (the wrapped module's input at the last prompt token of an edit), a value (a
vector that replaces the module's output there, trained on the target's NLL with the prompt masked), a
deferral radius ``ε`` and the label (the edit's target). At inference every position's input is compared
with the keys (Euclidean distance); where the nearest key lies within its radius the module's output at that
position is replaced by the key's value, elsewhere the model is untouched.

Edits are added one after another with GRACE's rules: a new key outside every radius (plus ``ε_init``) is
added; a key inside the nearest entry's reach with the same label expands that entry's radius to cover it
and retrains its value; with another label both radii are split to half the distance and the new key is added.

Matching is per position rather than at a stored token index, so it works on any batch the scorer builds.
The codebook is saved as safetensors plus a JSON of settings (:func:`save_grace`) and attached to a freshly
loaded model with :func:`load_grace`; it cannot be merged into plain weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn
from tqdm.auto import tqdm

from ftedit.atomic import write_bytes_atomic, write_json_atomic
from ftedit.baselines.common import BaselineError, Probe, activations_at, resolve_layers
from ftedit.data.requests import EditRequest
from ftedit.errors import InputError
from ftedit.forward import hidden_entering, lm_parts, model_device, per_example_nll, prefix_replaced
from ftedit.params import Target, find_blocks, select_targets, weight_out_in
from ftedit.registry import AppliedEdit, ApplyContext, TouchedModule
from ftedit.tokenization import encode_pair, pad_right

logger = logging.getLogger(__name__)

FORMAT = 1
TENSORS = "codebook.safetensors"
SETTINGS = "grace.json"


@dataclass
class GRACEHyperParams:
    """GRACE's settings: EasyEdit's GRACE radius (ε_init 1.0), fewer value steps (it takes 100 at lr 1.0).

    The radius is a distance in the key space, so its meaning depends on the model. On gemma-3-270m (layer 11's
    down projection, 40 COUNTERFACT train-split prompts) keys have norm ~8.7, distinct prompts lie 1.3 to 9
    apart and a prompt's neighbors (same relation, another subject) 0.3 to 10: ε = 1 keeps most neighbors out.
    """

    layer: str = "frac:0.66"  # the wrapped layer: an index or "frac:x" (gemma-3-270m: 11 of 18)
    module: str = "down"  # the wrapped linear layer's role (ftedit.params): key = its input, value = its output
    epsilon: float = 1.0  # ε_init, the initial deferral radius (Euclidean distance in the key space)
    steps: int = 40  # at most this many Adam steps on each value
    lr: float = 0.5  # Adam learning rate of a value
    loss_break: float = 0.05  # stop training a value once the target's mean NLL is below this
    seed: int = 0  # torch's seed before the model is loaded and edited (`ftedit edit --seed`)


@dataclass
class Codebook:
    """Keys ``[n, d_in]``, values ``[n, d_out]``, radii ``[n]`` and one label per entry."""

    keys: torch.Tensor
    values: torch.Tensor
    epsilons: torch.Tensor
    labels: list[str]

    @classmethod
    def empty(cls, d_in: int, d_out: int) -> Codebook:
        return cls(torch.zeros(0, d_in), torch.zeros(0, d_out), torch.zeros(0), [])

    def __len__(self) -> int:
        return len(self.labels)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index of the nearest key, its distance) for each row of ``queries`` ``[m, d_in]``."""
        dist = torch.cdist(queries.float(), self.keys.to(queries.device).float())
        return dist.min(dim=1).indices, dist.min(dim=1).values

    def add(self, key: torch.Tensor, value: torch.Tensor, epsilon: float, label: str) -> int:
        self.keys = torch.cat([self.keys, key.detach().float().cpu()[None]])
        self.values = torch.cat([self.values, value.detach().float().cpu()[None]])
        self.epsilons = torch.cat([self.epsilons, torch.tensor([float(epsilon)])])
        self.labels.append(label)
        return len(self) - 1


class GraceLayer:
    """The codebook attached to one module by a forward hook; ``remove()`` detaches it."""

    def __init__(self, model: nn.Module, target: Target, codebook: Codebook):
        self.model, self.target, self.codebook = model, target, codebook
        self.hits = 0  # positions replaced so far (for tests and logs)
        self._handle = target.module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not len(self.codebook):
            return output
        x = args[0]
        flat_in, flat_out = x.reshape(-1, x.shape[-1]), output.reshape(-1, output.shape[-1])
        index, dist = self.codebook.nearest(flat_in)
        hit = dist <= self.codebook.epsilons.to(dist.device)[index]
        if not hit.any():
            return output
        self.hits += int(hit.sum())
        values = self.codebook.values.to(device=output.device, dtype=output.dtype)[index]
        return torch.where(hit[:, None], values, flat_out).view_as(output)

    def remove(self) -> nn.Module:
        self._handle.remove()
        return self.model


def _target(model: nn.Module, layer: str | int, module: str) -> Target:
    _, blocks = find_blocks(model)
    layers = resolve_layers(layer, len(blocks))
    if len(layers) != 1:
        raise BaselineError(f"GRACE wraps one layer; layer={layer!r} selects {layers}")
    targets = select_targets(model, layers, module)
    if len(targets) != 1:
        raise BaselineError(f"GRACE wraps one linear layer; module={module!r} selects {[t.name for t in targets]}")
    return targets[0]


# ------------------------------------------------------------------------------------------ training a value


@contextlib.contextmanager
def _replaced_at(module: nn.Module, position: int, value: torch.Tensor):
    """``module``'s output at ``position`` of every row replaced by ``value`` (registered after the codebook's
    hook, so it wins there)."""

    def hook(mod, args, output):
        mask = torch.zeros(output.shape[1], 1, dtype=torch.bool, device=output.device)
        mask[position] = True
        return torch.where(mask, value.to(output.dtype), output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def train_value(model: nn.Module, tok, target: Target, request: EditRequest, init: torch.Tensor,
                cfg: GRACEHyperParams) -> tuple[torch.Tensor, dict[str, float]]:
    """A value that makes ``request``'s prompt predict its new target when it replaces ``target``'s output at the
    last prompt token: Adam on the target's mean NLL (prompt masked), the blocks below computed once."""
    pair = encode_pair(tok, request.prompt, request.target_new)
    batch = pad_right([pair], tok.pad_token_id).to(model_device(model))
    _, blocks = find_blocks(model)
    lm_parts(model)  # verify the body/head split now, while the real blocks are in place
    cached, as_tuple = (None, False) if target.layer == 0 else hidden_entering(
        model, blocks, target.layer, batch.input_ids, batch.attention_mask)
    value = init.detach().float().clone().to(batch.input_ids.device).requires_grad_(True)
    opt = torch.optim.Adam([value], lr=cfg.lr)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    info: dict[str, float] = {}
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with _replaced_at(target.module, pair.target_start - 1, value), \
                (prefix_replaced(blocks, target.layer, cached, as_tuple) if cached is not None
                 else contextlib.nullcontext()):
            for step in range(cfg.steps + 1):
                nll = per_example_nll(model, batch)[0].mean()
                info = {"steps": step, "nll": nll.item()}
                if nll.item() < cfg.loss_break or step == cfg.steps:
                    break
                opt.zero_grad()
                nll.backward()
                opt.step()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return value.detach(), info


# ------------------------------------------------------------------------------------------ sequential editing


def _key_and_output(model: nn.Module, tok, target: Target, request: EditRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """``target``'s input and output at the last prompt token of ``request`` (the output as the codebook
    leaves it)."""
    pair = encode_pair(tok, request.prompt, request.target_new)
    probe = Probe(pair, pair.target_start - 1)
    key = activations_at(model, tok, [probe], target.module, "input")[0]
    output = activations_at(model, tok, [probe], target.module, "output")[0]
    return key, output


def insert_edit(layer: GraceLayer, tok, request: EditRequest, cfg: GRACEHyperParams) -> dict[str, Any]:
    """Add one edit to the codebook by GRACE's add / expand / split rules; return what was done."""
    book, label = layer.codebook, request.target_new.strip()
    key, current = _key_and_output(layer.model, tok, layer.target, request)
    if not len(book):
        return _add(layer, tok, request, cfg, key, current, cfg.epsilon, "add")
    index, dist = (t.item() for t in book.nearest(key[None]))
    if dist > book.epsilons[index].item() + cfg.epsilon:
        return _add(layer, tok, request, cfg, key, current, cfg.epsilon, "add", dist)
    if book.labels[index] != label:
        book.epsilons[index] = dist / 2
        return {**_add(layer, tok, request, cfg, key, current, dist / 2, "split", dist), "halved": index}
    book.epsilons[index] = max(book.epsilons[index].item(), dist)
    value, info = train_value(layer.model, tok, layer.target, request, book.values[index], cfg)
    book.values[index] = value.cpu()
    return {"action": "expand", "entry": index, "distance": dist, **info}


def _add(layer: GraceLayer, tok, request: EditRequest, cfg: GRACEHyperParams, key, init, epsilon: float,
         action: str, dist: float | None = None) -> dict[str, Any]:
    value, info = train_value(layer.model, tok, layer.target, request, init, cfg)
    entry = layer.codebook.add(key, value, epsilon, request.target_new.strip())
    return {"action": action, "entry": entry, "distance": dist, **info}


def apply_grace_to_model(model: nn.Module, tok, requests: Sequence[EditRequest], hparams: GRACEHyperParams,
                         *, progress: bool = True, layer: GraceLayer | None = None) -> tuple[GraceLayer, list]:
    """Attach a codebook to ``model`` (or extend ``layer``'s) and insert ``requests`` one after another."""
    if layer is None:
        target = _target(model, hparams.layer, hparams.module)
        d_out, d_in = weight_out_in(target.module).shape
        layer = GraceLayer(model, target, Codebook.empty(d_in, d_out))
    log = []
    try:
        for request in tqdm(requests, desc="GRACE", disable=not progress):
            log.append(insert_edit(layer, tok, request, hparams))
            logger.info("GRACE edit %d/%d: %s", len(log), len(requests), log[-1])
    except BaseException:
        layer.remove()
        raise
    return layer, log


def _out_features(target: Target) -> int:
    return weight_out_in(target.module).shape[0]


def apply_grace(model: nn.Module, tok, requests: Sequence[EditRequest], hparams: GRACEHyperParams,
                context: ApplyContext) -> AppliedEdit:
    """The registry's entry point: a codebook on ``model``, edits inserted in order (sequential editing)."""
    start = time.perf_counter()
    layer, log = apply_grace_to_model(model, tok, requests, hparams, progress=context.progress)
    seconds = time.perf_counter() - start
    t = layer.target
    return AppliedEdit(method="grace", model=model, config=dataclasses.asdict(hparams),
                       touched=[TouchedModule(t.name, t.layer, t.role)], weights="codebook", seconds=seconds,
                       restore_weights=layer.remove, seed=hparams.seed,
                       trainable_parameters=int(layer.codebook.values.numel()), phase_seconds={"edit": seconds},
                       log={"entries": len(layer.codebook), "edits": log},
                       save_state=lambda path: save_grace(layer, path, hparams))


# ------------------------------------------------------------------------------------------ save and load


def save_grace(layer: GraceLayer, path: str | Path, hparams: GRACEHyperParams | None = None) -> Path:
    """Write ``layer``'s codebook to the folder ``path``: ``codebook.safetensors`` (keys, values, epsilons) and
    ``grace.json`` (the wrapped module, labels, settings)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    book, t = layer.codebook, layer.target
    write_bytes_atomic(path / TENSORS, save_tensors({"keys": book.keys.contiguous(), "values": book.values.contiguous(),
                                                     "epsilons": book.epsilons.contiguous()}))
    write_json_atomic(path / SETTINGS, {"format": FORMAT, "method": "grace", "module": t.name, "layer": t.layer,
                                        "role": t.role, "labels": book.labels,
                                        "hparams": dataclasses.asdict(hparams) if hparams else None})
    return path


def load_grace(model: nn.Module, path: str | Path) -> GraceLayer:
    """Attach the codebook saved in the folder ``path`` (by ``ftedit edit --recipe grace --save codebook`` or
    :func:`save_grace`) to ``model``, the base model it was made on; ``.remove()`` on the result detaches it."""
    path = Path(path)
    try:
        settings = json.loads((path / SETTINGS).read_text())
        tensors = load_file(str(path / TENSORS))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a GRACE codebook ({e})") from None
    if settings.get("format") != FORMAT:
        raise InputError(f"{path / SETTINGS}: format {settings.get('format')!r}, this ftedit reads {FORMAT}")
    target = _target(model, settings["layer"], settings["role"])
    book = Codebook(tensors["keys"], tensors["values"], tensors["epsilons"], list(settings["labels"]))
    if target.name != settings["module"] or book.values.shape[1] != _out_features(target):
        raise InputError(f"{path / SETTINGS}: the codebook wraps {settings['module']} (values of size "
                         f"{book.values.shape[1]}); this model has {target.name} of output size {_out_features(target)}")
    return GraceLayer(model, target, book)
