"""Cross-check ftedit's ROME, MEMIT, AlphaEdit and FT-M against EasyEdit's implementations of the same methods.

Both sides edit the same model object with the same requests, hyperparameters, key statistics and context
prefixes, start from the same unedited weights, and are scored by ftedit's harness
(``ftedit.evaluate.evaluate_requests``). The reference code is only imported, never copied: point
``--reference`` at a checkout of EasyEdit kept outside this repository, e.g.

    git --git-dir=/work/.mirror/zjunlp+EasyEdit/repo archive --prefix=EasyEdit/ HEAD easyeditor hparams \
        | tar x -C /work/ref          # EasyEdit 14cea82, only the package and its configs

    flock /tmp/ftedit-realmodel.lock env PYTHONPATH=$PWD/src /work/main/.venv/bin/python \
        benchmarks/crosscheck_reference.py --reference /work/ref/EasyEdit --model demo --n 20 \
        --methods rome memit --stats-dir /work/ref/stats --out runs/crosscheck-rome-memit.json    # 50 min
    ... --n 20 --ft-n 30 --methods alphaedit ft-m --out runs/crosscheck-alphaedit-ftm.json
    ... --methods rome --sides ftedit --ftedit-variant reversed-kl reference-denominator \
        --out runs/crosscheck-rome-variant.json          # ftedit's ROME with the reference's scale

    # seconds, no lock: the test suite's tiny random models (tests/tiny.py) and the fixture records
    PYTHONPATH=$PWD/src /work/main/.venv/bin/python benchmarks/crosscheck_reference.py \
        --reference /work/ref/EasyEdit --model tiny-llama \
        --data ../shared/data/fixtures/counterfact_rome_format_first5.json --n 5 --ft-n 5 --stats-samples 50 \
        --ftedit-variant reference-keys reference-denominator --out runs/tiny/llama.json

Methods run cheapest first (FT-M, ROME, MEMIT, AlphaEdit); the report is rewritten after each. EasyEdit's MEMIT
and AlphaEdit take about 65 s per request on gemma-3-270m on 2 shared cores.

What is shared, and how:

* Statistics. ftedit collects (or reads from its cache) ``C = E[k kᵀ]`` for every layer a method edits
  (``--stats-samples`` texts of the default corpus, at most 128 tokens each) and writes the same matrices
  as the ``.npz`` files EasyEdit's ``layer_stats`` loads from its ``stats_dir`` (``SecondMoment`` with the
  token count), so EasyEdit computes nothing itself; the run checks that the matrix EasyEdit then returns
  equals ftedit's.
* Context prefixes (``--templates shared``, the default). ftedit's greedy prefixes are handed to EasyEdit as
  its cached context templates (``"{}"`` plus ``prefix + "{}"``); ``--templates reference`` lets EasyEdit
  sample its own (one per seed word and length, as many as ftedit's).
* Hyperparameters. Each reference config is built from ftedit's resolved config for the method (layers,
  value steps, lr, weight decay, KL factor, norm clamp, λ, null-space threshold, α; FT-M's steps, lr,
  threshold), with the module templates read from the model's structure.
* Precision. The model is loaded as fp32 (``--dtype fp32``): ftedit's bf16 autocast would be a difference of
  its own (EasyEdit runs fp32).

EasyEdit runs ROME and FT-M one request per call, applied in turn (its editor's ``sequential_edit``), and
MEMIT and AlphaEdit on all requests in one call. Also reported: for ROME's first edit, the two rank-one
updates compared directly (relative difference, cosines of their key and value directions); for MEMIT and
AlphaEdit, the share of each request's optimized target ``z`` that the edited model realizes at the band's
last block (bare prompt, subject's last token), and each layer's update norm; for FT-M, optimizer steps.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.optim.optimizer import register_optimizer_step_post_hook

import ftedit.baselines.alphaedit as ft_alphaedit
import ftedit.baselines.memit as ft_memit
import ftedit.baselines.rome as ft_rome
from ftedit.baselines.common import (
    activations_at,
    context_prefixes,
    down_proj,
    mean_keys,
    resolve_layers,
    rewrite_probes,
)
from ftedit.baselines.rome import rank_one_update
from ftedit.baselines.stats import StatsConfig, mom2, stats_path
from ftedit.data import load_requests
from ftedit.data.requests import EditRequest
from ftedit.evaluate import evaluate_requests
from ftedit.methods import apply_spec
from ftedit.models import load_model
from ftedit.outputs import write_json_atomic
from ftedit.params import find_blocks
from ftedit.registry import ApplyContext, get_method

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "easyedit"
KEYS = ("efficacy", "generalization", "locality", "edit_score")
STATS_DATASET = "ftedit_corpus"  # the dataset name in the reference's stats file names (it never loads it)
logger = logging.getLogger("crosscheck")


# ------------------------------------------------------------------------------------------ the reference


def import_reference(path: Path) -> types.SimpleNamespace:
    """EasyEdit's ROME, MEMIT, AlphaEdit and FT modules, imported from the checkout at ``path``.

    ``easyeditor/__init__.py`` imports every method, trainer and dataset it ships (and their dependencies);
    the two parent packages are registered empty so that only these four methods and their utilities load.
    """
    root = path / "easyeditor"
    if not (root / "models" / "rome" / "rome_main.py").is_file():
        raise SystemExit(f"{path}: not an EasyEdit checkout (no easyeditor/models/rome/rome_main.py)")
    sys.path.insert(0, str(path))
    for name, folder in (("easyeditor", root), ("easyeditor.models", root / "models")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
    names = {"rome": "models.rome.rome_main", "memit": "models.memit.memit_main",
             "alphaedit": "models.alphaedit.AlphaEdit_main", "ft": "models.ft.ft_main",
             "rome_hparams": "models.rome.rome_hparams", "memit_hparams": "models.memit.memit_hparams",
             "alphaedit_hparams": "models.alphaedit.AlphaEdit_hparams", "ft_hparams": "models.ft.ft_hparams",
             "runningstats": "util.runningstats"}
    return types.SimpleNamespace(**{k: importlib.import_module(f"easyeditor.{v}") for k, v in names.items()})


@dataclass
class Templates:
    """The reference's module-name templates (``{}`` = layer index), read from the model's structure."""

    rewrite: str  # the down projection
    layer: str  # the block
    mlp: str  # the module whose output is the down projection's
    ln_f: str  # the final norm
    lm_head: str  # the module holding the output embedding


def module_templates(model) -> Templates:
    blocks_name, blocks = find_blocks(model)
    first = down_proj(model, 0).name
    inside = first[len(f"{blocks_name}.0."):]
    params = {id(p): n for n, p in model.named_parameters()}
    head = params[id(model.get_output_embeddings().weight)].rsplit(".", 1)[0]  # tied: the input embedding
    rewrite = f"{blocks_name}.{{}}.{inside}"
    return Templates(rewrite, f"{blocks_name}.{{}}", rewrite.rsplit(".", 1)[0], _final_norm(model, blocks_name,
                                                                                              blocks), head)


@torch.no_grad()
def _final_norm(model, blocks_name: str, blocks) -> str:
    """The module that receives the last block's output (found by following the data, not by name)."""
    seen, found = {}, []

    def grab(mod, args, output):
        seen["out"] = output[0] if isinstance(output, tuple) else output

    def check(name):
        def hook(mod, args):
            if args and "out" in seen and args[0] is seen["out"]:
                found.append(name)
        return hook

    handles = [blocks[-1].register_forward_hook(grab)]
    handles += [m.register_forward_pre_hook(check(n)) for n, m in model.named_modules()
                if n and not n.startswith(f"{blocks_name}.") and n != blocks_name and not list(m.children())]
    ids = torch.tensor([[1, 2, 3]], device=next(model.parameters()).device)
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise SystemExit("cannot find the final norm: no module receives the last block's output")
    return found[0]


def reference_request(r: EditRequest) -> dict[str, Any]:
    return {"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new, "ground_truth": r.target_true,
            "case_id": r.case_id}


def _value_fields(value, n_layers: int) -> dict[str, Any]:
    return dict(fact_token="subject_last", v_num_grad_steps=value.steps, v_lr=value.lr, v_loss_layer=n_layers - 1,
                v_weight_decay=value.weight_decay, clamp_norm_factor=value.clamp_norm_factor,
                kl_factor=value.kl_factor)


def _module_fields(tpl: Templates) -> dict[str, Any]:
    return dict(rewrite_module_tmp=tpl.rewrite, layer_module_tmp=tpl.layer, mlp_module_tmp=tpl.mlp,
                attn_module_tmp="", ln_f_module=tpl.ln_f, lm_head_module=tpl.lm_head)


def _stats_fields(stats: StatsConfig, stats_dir: Path) -> dict[str, Any]:
    return dict(mom2_dataset=STATS_DATASET, mom2_n_samples=stats.n_samples, mom2_dtype="float32",
                stats_dir=str(stats_dir), device="cpu")


def reference_hparams(ref, method: str, cfg, layers: list[int], n_layers: int, tpl: Templates, stats_dir: Path,
                      model_name: str):
    """The reference's hyperparameter object for ``method``, set from ftedit's resolved ``cfg``."""
    if method == "ft-m":
        return ref.ft_hparams.FTHyperParams(
            layers=layers, num_steps=cfg.train.steps_per_edit, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
            kl_factor=0, norm_constraint=False, rewrite_module_tmp=tpl.rewrite + ".weight", layer_module_tmp=tpl.layer,
            mlp_module_tmp=tpl.mlp, attn_module_tmp="", ln_f_module=tpl.ln_f, lm_head_module=tpl.lm_head,
            device="cpu", alg_name="FT", model_name=model_name, objective_optimization="target_new",
            batch_size=cfg.train.batch_size)
    common = {**_value_fields(cfg.value, n_layers), **_module_fields(tpl), **_stats_fields(cfg.stats, stats_dir),
              "layers": layers, "model_name": model_name}
    if method == "rome":
        return ref.rome_hparams.ROMEHyperParams(
            **common, alg_name="ROME", mom2_adjustment=cfg.mom2_adjustment,
            context_template_length_params=[[n, 5] for n in cfg.value.context_lengths])
    if method == "memit":
        return ref.memit_hparams.MEMITHyperParams(**common, alg_name="MEMIT", layer_selection="all",
                                                  mom2_adjustment=True, mom2_update_weight=cfg.mom2_update_weight)
    if method == "alphaedit":
        # the reference sizes its null-space projection by the model's name ("llama"/"qwen": [d_ff, d_ff] for
        # weights stored [d_model, d_ff]); gemma's down projections are stored that way
        common["model_name"] = f"{model_name} (llama weight layout)"
        return ref.alphaedit_hparams.AlphaEditHyperParams(
            **common, alg_name="AlphaEdit", layer_selection="all", mom2_adjustment=True, mom2_update_weight=15000.0,
            nullspace_threshold=cfg.nullspace_threshold, L2=cfg.l2, P_loc=str(stats_dir / "P-absent.pt"))
    raise ValueError(f"no reference for {method!r}")


def shared_templates(ref, prefixes: Sequence[str], method: str) -> None:
    """Hand ftedit's context prefixes to the reference as its cached context templates."""
    flat = ["{}"] + [p + "{}" for p in prefixes[1:]]
    if method == "rome":
        ref.rome.CONTEXT_TEMPLATES_CACHE = flat
    elif method == "memit":
        ref.memit.CONTEXT_TEMPLATES_CACHE = [flat[:1], flat[1:]]
    elif method == "alphaedit":
        ref.alphaedit.CONTEXT_TEMPLATES_CACHE = [flat[:1], flat[1:]]


# ------------------------------------------------------------------------------------------ statistics


def write_reference_stats(ref, model, tok, layers: Sequence[int], cfg: StatsConfig, fingerprint: str,
                          stats_dir: Path) -> dict[int, torch.Tensor]:
    """ftedit's ``C`` per layer, also written where the reference's ``layer_stats`` looks for it."""
    targets = [down_proj(model, i) for i in layers]
    covs = mom2(model, tok, targets, cfg, fingerprint, progress=False)
    folder = stats_dir / model.config._name_or_path.rsplit("/")[-1] / f"{STATS_DATASET}_stats"
    for t in targets:
        with safe_open(str(stats_path(fingerprint, t, cfg)), "pt") as f:
            tokens = int(f.metadata()["tokens"])
        stat = ref.runningstats.CombinedStat(mom2=ref.runningstats.SecondMoment())
        stat.mom2.count, stat.mom2.mom2 = tokens, covs[t.layer].double() * tokens
        path = folder / f"{t.name}_float32_mom2_{cfg.n_samples}.npz"
        ref.runningstats.save_cached_state(str(path), stat, {"sample_size": cfg.n_samples})
        logger.info("statistics of %s (%d tokens) -> %s", t.name, tokens, path)
    return covs


def check_reference_stats(ref, model, tok, covs: dict[int, torch.Tensor], cfg: StatsConfig,
                          stats_dir: Path) -> dict[int, float]:
    """Largest |C_reference − C_ftedit| / max |C_ftedit| per layer, C_reference as the reference's MEMIT loads it."""
    hp = types.SimpleNamespace(stats_dir=str(stats_dir), device="cpu")
    out = {}
    for layer, cov in covs.items():
        theirs = ref.memit.get_cov(model, tok, down_proj(model, layer).name, STATS_DATASET, cfg.n_samples,
                                   "float32", hparams=hp)
        out[layer] = ((theirs.double() - cov.double()).abs().max() / cov.abs().max()).item()
    if max(out.values()) > 1e-6:
        raise SystemExit(f"the reference read different statistics: {out}")
    return out


# ------------------------------------------------------------------------------------------ running a side


class Weights:
    """Copies of every down projection's weight; ``restore()`` puts them back (both sides only change those)."""

    def __init__(self, model):
        n_layers = len(find_blocks(model)[1])
        self.targets = [down_proj(model, i) for i in range(n_layers)]
        self.saved = {t.layer: t.module.weight.detach().clone() for t in self.targets}
        self.flags = [(p, p.requires_grad) for p in model.parameters()]

    def deltas(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        return {t.layer: (t.module.weight.detach() - self.saved[t.layer]).clone() for t in self.targets
                if t.layer in layers}

    @torch.no_grad()
    def restore(self) -> None:
        for t in self.targets:
            t.module.weight.copy_(self.saved[t.layer])
        for p, flag in self.flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def reference_output(log_file: Path):
    """The reference prints its progress: into ``log_file``, not the console."""
    with log_file.open("a") as f, contextlib.redirect_stdout(f):
        yield


@contextlib.contextmanager
def counted_steps():
    """Counts optimizer steps taken anywhere (the reference's FT creates its optimizers internally)."""
    box = {"steps": 0}

    def hook(opt, args, kwargs):
        box["steps"] += 1

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@contextlib.contextmanager
def recorded(module, name: str, box: list):
    """Record what ``module.name`` returns while it is in place (to read the optimized targets z)."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        box.append(result)
        return result

    setattr(module, name, wrapper)
    try:
        yield box
    finally:
        setattr(module, name, original)


def z_realized(model, tok, requests: Sequence[EditRequest], z_layer: int, before: torch.Tensor,
               targets: torch.Tensor) -> dict[str, float]:
    """How much of each request's intended change of the band's last block output (``targets − before``, at the
    bare prompt's subject token) the edited model produces: mean projection ratio and mean cosine."""
    _, blocks = find_blocks(model)
    probes = [rewrite_probes(tok, r, [""], None)[0] for r in requests]
    after = activations_at(model, tok, probes, blocks[z_layer], "output")
    want, got = targets - before, after - before
    ratio = (got * want).sum(1) / (want * want).sum(1)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    return {"projection_ratio": ratio.mean().item(), "cosine": cos.mean().item(),
            "intended_norm": want.norm(dim=1).mean().item()}


def _reference_keys(original):
    """MEMIT's reference keys: the mean of the bare prompt's key and of the prefixed prompts' mean key."""
    def keys(model, tok, requests, prefixes, layer):
        return 0.5 * original(model, tok, requests, prefixes[:1], layer) + \
            0.5 * original(model, tok, requests, prefixes[1:], layer)
    return keys


def _reference_denominator():
    """ROME's update scaled as the reference scales it: ``δ uᵀ / (uᵀ k)`` with ``k`` the bare prompt's key (ftedit:
    ``uᵀ k̄``, k̄ averaged over the prefixes); ``u = C⁻¹ k̄`` on both sides."""
    seen = {}
    original_keys, original_update = ft_rome.mean_keys, ft_rome.rank_one_update

    def keys(model, tok, requests, prefixes, layer):
        seen["bare"] = original_keys(model, tok, requests, [""], layer)[:, 0]
        return original_keys(model, tok, requests, prefixes, layer)

    def update(weight, key, value, cov):
        u = torch.linalg.solve(cov.double(), key.double()) if cov is not None else key.double()
        return original_update(weight, key, value, cov) * ((u @ key.double()) / (u @ seen["bare"]))

    return [(ft_rome, "mean_keys", keys), (ft_rome, "rank_one_update", update)]


VARIANTS = ("none", "reversed-kl", "reference-keys", "plain-residual", "reference-denominator")


def _variant_patches(name: str) -> list[tuple[Any, str, Any]]:
    if name == "reference-keys":
        return [(ft_memit, "mean_keys", _reference_keys(ft_memit.mean_keys))]
    if name == "plain-residual":
        return [(ft_memit, "post_mlp_module", lambda model, layer: None)]
    if name == "reference-denominator":
        return _reference_denominator()
    return []


@contextlib.contextmanager
def ftedit_variant(names: Sequence[str]):
    """ftedit's side with some of the reference's choices (patched for this run only), to measure what they
    change: ``reversed-kl`` (the reference's KL(edited || original) in the value objective: ftedit's own since its
    fix, so nothing is patched; kept so that earlier commands still run), ``reference-keys`` (MEMIT/AlphaEdit
    key averaging),
    ``plain-residual`` (MEMIT/AlphaEdit: block-output residuals written into the down projection as they are,
    without mapping them through a post-MLP norm), ``reference-denominator`` (ROME's scale)."""
    patches = [p for name in names for p in _variant_patches(name)]
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in patches]
    for module, attr, value in patches:
        setattr(module, attr, value)
    try:
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def score(model, tok, requests) -> dict[str, Any]:
    result = evaluate_requests(model, tok, requests, progress=False, details=True)
    return {**{k: result.summary[k] for k in KEYS}, "records": result.records}


# ------------------------------------------------------------------------------------------ methods


@dataclass
class Run:
    """One method: ftedit's resolved config, its layers and the requests it edits."""

    method: str
    cfg: Any
    layers: list[int]
    requests: list[EditRequest]


def run_ftedit(model, tok, run: Run, identity, weights: Weights, variant: Sequence[str] = ()) -> dict[str, Any]:
    spec = get_method(run.method)
    box: list = []
    patch = {"memit": (ft_memit, "target_values"), "alphaedit": (ft_alphaedit, "target_values")}.get(run.method)
    record = recorded(*patch, box) if patch else contextlib.nullcontext()
    torch.manual_seed(getattr(run.cfg, "seed", 0) if not hasattr(run.cfg, "train") else run.cfg.train.seed)
    start = time.perf_counter()
    with record, ftedit_variant(variant):
        applied = apply_spec(spec, run.cfg, model, tok, run.requests,
                             ApplyContext(progress=False, model_fingerprint=identity.fingerprint, identity=identity))
    out: dict[str, Any] = {"edit_seconds": time.perf_counter() - start,
                           "touched": [t.layer for t in applied.touched]}
    if applied.train:
        out["steps"] = sum(t.steps for t in applied.train)
        out["skipped_steps"] = sum(t.skipped_steps for t in applied.train)
    out["deltas"] = weights.deltas(run.layers)
    out["zs"] = box[0][0] if box else None
    out["log"] = applied.log
    return out


def run_reference(ref, model, tok, run: Run, hparams, log_file: Path, workdir: Path,
                  weights: Weights) -> dict[str, Any]:
    requests = [reference_request(r) for r in run.requests]
    out: dict[str, Any] = {}
    zs: list = []
    start = time.perf_counter()
    with reference_output(log_file), counted_steps() as steps:
        if run.method in ("rome", "ft-m"):
            apply = ref.rome.apply_rome_to_model if run.method == "rome" else ref.ft.apply_ft_to_model
            for i, request in enumerate(requests):
                apply(model, tok, [request], hparams)
                if i == 0:
                    out["first_deltas"] = weights.deltas(run.layers)
        elif run.method == "memit":
            with recorded(ref.memit, "compute_z", zs):
                ref.memit.apply_memit_to_model(model, tok, requests, hparams)
        else:  # AlphaEdit saves its projection into the working directory
            with recorded(ref.alphaedit, "compute_z", zs), contextlib.chdir(workdir):
                ref.alphaedit.apply_AlphaEdit_to_model(model, tok, requests, hparams, reset_cache=True)
    out["edit_seconds"] = time.perf_counter() - start
    if run.method == "ft-m":
        out["steps"] = steps["steps"]
    out["deltas"] = weights.deltas(run.layers)
    out["zs"] = torch.stack([z.detach().float() for z in zs]) if zs else None
    return out


def compare_rome_first(model, tok, run: Run, ftedit_side: dict, reference_side: dict, cov: torch.Tensor,
                       weights: Weights) -> dict[str, float]:
    """ROME's first edit on both sides: ftedit's update rebuilt from its logged δ (the first edit is made on the
    unedited weights), against the reference's recorded update."""
    layer = run.layers[0]
    mine_key = mean_keys(model, tok, run.requests[:1], ftedit_side["log"]["prefixes"], layer)[:, 0]
    bare_key = mean_keys(model, tok, run.requests[:1], [""], layer)[:, 0]
    w0 = weights.saved[layer].double()
    delta = ftedit_side["log"]["deltas"][0].double()
    mine = rank_one_update(w0, mine_key, w0 @ mine_key + delta, cov if run.cfg.mom2_adjustment else None)
    theirs = reference_side["first_deltas"][layer].double()
    u_m, _, v_m = torch.linalg.svd(mine, full_matrices=False)
    u_t, _, v_t = torch.linalg.svd(theirs, full_matrices=False)
    direction = torch.linalg.solve(cov.double(), mine_key) if run.cfg.mom2_adjustment else mine_key
    return {"relative_difference": ((mine - theirs).norm() / theirs.norm()).item(),
            "norm_ratio_ftedit_over_reference": (mine.norm() / theirs.norm()).item(),
            "cos_value_direction": abs(u_m[:, 0] @ u_t[:, 0]).item(),
            "cos_key_direction": abs(v_m[0] @ v_t[0]).item(),
            "cos_value_direction_vs_ftedit_delta": abs(u_t[:, 0] @ delta / delta.norm()).item(),
            # ftedit divides by uᵀk̄ (k̄: key averaged over the prefixes), the reference by uᵀk (bare prompt's key)
            "denominator_ratio_bare_over_mean": ((direction @ bare_key) / (direction @ mine_key)).item()}


def delta_summary(ftedit_side: dict, reference_side: dict) -> dict[int, dict[str, float]]:
    out = {}
    for layer, mine in ftedit_side["deltas"].items():
        theirs = reference_side["deltas"][layer]
        out[layer] = {"ftedit_norm": mine.norm().item(), "reference_norm": theirs.norm().item(),
                      "relative_difference": ((mine - theirs).norm() / theirs.norm().clamp_min(1e-30)).item()}
    return out


# ------------------------------------------------------------------------------------------ main


METHODS = ("rome", "memit", "alphaedit", "ft-m")
# cheapest first: EasyEdit's MEMIT and AlphaEdit take ~80 s per request on gemma-3-270m (2 CPU cores), because
# their value optimization computes log-softmax over the whole 262k vocabulary at every position
RUN_ORDER = ("ft-m", "rome", "memit", "alphaedit")


def method_overrides(sets: Sequence[str], method: str) -> list[str]:
    """``--set`` values for ``method``: ``key=value`` (every method) and ``METHOD:key=value`` (that one)."""
    out = []
    for s in sets:
        head, sep, rest = s.partition(":")
        if sep and head in METHODS:
            out += [rest] if head == method else []
        else:
            out.append(s)
    return out


def build_runs(args, model, requests: list[EditRequest], ft_requests: list[EditRequest]) -> list[Run]:
    n_layers = len(find_blocks(model)[1])
    runs = []
    for method in sorted(set(args.methods), key=RUN_ORDER.index):
        stats = [] if method == "ft-m" else [f"stats.n_samples={args.stats_samples}"]
        cfg = get_method(method).resolve_config(overrides=stats + method_overrides(args.set, method))
        spec = cfg.layer if method == "rome" else cfg.params.layers if method == "ft-m" else cfg.layers
        runs.append(Run(method, cfg, resolve_layers(spec, n_layers), ft_requests if method == "ft-m" else requests))
    return runs


def compare(ref, model, tok, identity, run: Run, args, stats_dir: Path, tpl: Templates,
            covs: dict[int, torch.Tensor]) -> dict[str, Any]:
    weights = Weights(model)
    n_layers = len(find_blocks(model)[1])
    row: dict[str, Any] = {"method": run.method, "layers": run.layers, "n": len(run.requests)}
    if run.method != "ft-m":
        prefixes = context_prefixes(model, tok, run.cfg.value)
        row["prefixes"] = prefixes
        if args.templates == "shared":
            shared_templates(ref, prefixes, run.method)
    z_layer = run.layers[-1]
    bare = [rewrite_probes(tok, r, [""], None)[0] for r in run.requests]
    before = activations_at(model, tok, bare, find_blocks(model)[1][z_layer], "output")
    sides: dict[str, dict] = {}
    for side in args.sides:
        logger.info("%s: %s side on %d requests", run.method, side, len(run.requests))
        try:
            if side == "ftedit":
                result = run_ftedit(model, tok, run, identity, weights, args.ftedit_variant)
            else:
                hparams = reference_hparams(ref, run.method, run.cfg, run.layers, n_layers, tpl, stats_dir,
                                            identity.spec)
                result = run_reference(ref, model, tok, run, hparams, args.reference_log, stats_dir, weights)
            if result.get("zs") is not None:
                result["z_realized"] = z_realized(model, tok, run.requests, z_layer, before, result["zs"])
            result["scores"] = score(model, tok, run.requests)
        finally:
            weights.restore()
        sides[side] = result
        logger.info("%s %s: %s", run.method, side, {k: round(result["scores"][k], 1) for k in KEYS} |
                    {k: result[k] for k in ("steps", "skipped_steps", "z_realized") if k in result})
    if len(sides) == 2:
        row["weight_deltas"] = delta_summary(sides["ftedit"], sides["reference"])
        if run.method == "rome" and "log" in sides["ftedit"]:
            row["rome_first_edit"] = compare_rome_first(model, tok, run, sides["ftedit"], sides["reference"],
                                                        covs[run.layers[0]], weights)
            logger.info("ROME first edit: %s", row["rome_first_edit"])
    row["sides"] = {side: {k: v for k, v in r.items() if k not in ("deltas", "first_deltas", "zs", "log")}
                    for side, r in sides.items()}
    return row


TINY = {"tiny-llama": "tiny_llama", "tiny-gemma3": "tiny_gemma3"}  # the test suite's random models (tests/tiny.py)


def tiny_model_dir(name: str, folder: Path) -> str:
    """Save one of the test suite's tiny random models (and its tokenizer) in ``folder``, for a quick check."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    tiny = importlib.import_module("tiny")
    tok = tiny.metaspace_tokenizer()
    getattr(tiny, TINY[name])(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="an EasyEdit checkout (outside this repository)")
    ap.add_argument("--model", default="demo", help=f"an ftedit model spec, or one of {sorted(TINY)}")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--data", default=str(DATA / "counterfact-edit.json"))
    ap.add_argument("--n", type=int, default=20, help="requests for ROME, MEMIT and AlphaEdit")
    ap.add_argument("--ft-n", type=int, default=30, help="requests for FT-M")
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    choices=METHODS)
    ap.add_argument("--sides", nargs="+", default=["ftedit", "reference"], choices=["ftedit", "reference"])
    ap.add_argument("--set", action="append", default=[],
                    help="override of ftedit's config, used by both sides: key=value or METHOD:key=value")
    ap.add_argument("--templates", default="shared", choices=["shared", "reference"])
    ap.add_argument("--ftedit-variant", nargs="+", default=["none"], choices=VARIANTS,
                    help="run ftedit's side with one of the reference's choices (see ftedit_variant)")
    ap.add_argument("--stats-samples", type=int, default=StatsConfig.n_samples)
    ap.add_argument("--stats-dir", type=Path, default=None, help="where the reference's statistics files go "
                    "(default: a temporary folder)")
    ap.add_argument("--reference-log", type=Path, default=None, help="the reference's printed output "
                    "(default: next to --out, or crosscheck-reference.log)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.reference_log = args.reference_log or Path(f"{args.out}.reference.log" if args.out
                                                    else "crosscheck-reference.log")

    ref = import_reference(args.reference.resolve())
    with contextlib.ExitStack() as stack:
        spec = tiny_model_dir(args.model, Path(stack.enter_context(tempfile.TemporaryDirectory()))) \
            if args.model in TINY else args.model
        model, tok, identity = load_model(spec, dtype=args.dtype)
    requests = load_requests(args.data, n=args.n).requests
    ft_requests = load_requests(args.data, n=args.ft_n).requests
    runs = build_runs(args, model, requests, ft_requests)
    tpl = module_templates(model)
    with contextlib.ExitStack() as stack:
        stats_dir = args.stats_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crosscheck-")))
        stats_cfgs = {r.method: r.cfg.stats for r in runs if r.method != "ft-m"}
        covs: dict[int, torch.Tensor] = {}
        report: dict[str, Any] = {"model": identity.to_dict(), "dtype": args.dtype, "templates": args.templates,
                                  "ftedit_variant": args.ftedit_variant, "sets": args.set,
                                  "reference": str(args.reference), "module_templates": vars(tpl), "rows": []}
        if stats_cfgs:
            stats_cfg = next(iter(stats_cfgs.values()))
            if any(c != stats_cfg for c in stats_cfgs.values()):
                raise SystemExit("the methods ask for different statistics settings; run them separately")
            layers = sorted({i for r in runs if r.method != "ft-m" for i in r.layers})
            covs = write_reference_stats(ref, model, tok, layers, stats_cfg, identity.fingerprint, stats_dir)
            report["stats"] = {"corpus": stats_cfg.corpus, "n_samples": stats_cfg.n_samples,
                               "max_length": stats_cfg.max_length,
                               "reference_vs_ftedit_max_relative_difference": None}
            with reference_output(args.reference_log):
                check = check_reference_stats(ref, model, tok, covs, stats_cfg, stats_dir)
            report["stats"]["reference_vs_ftedit_max_relative_difference"] = check
            logger.info("statistics as the reference reads them, max relative difference per layer: %s", check)
        report["unedited"] = {k: v for k, v in score(model, tok, requests).items() if k != "records"}
        for run in runs:
            report["rows"].append(compare(ref, model, tok, identity, run, args, stats_dir, tpl, covs))
            if args.out:
                write_json_atomic(args.out, report)
    _print(report)


def _print(report: dict) -> None:
    lines = [f"{'method':<10} {'side':<10} {'ES':>6} {'PS':>6} {'NS':>6} {'steps':>6} {'edit s':>7}"]
    for row in report["rows"]:
        for side, r in row["sides"].items():
            s = r["scores"]
            lines.append(f"{row['method']:<10} {side:<10} {s['efficacy']:6.1f} {s['generalization']:6.1f} "
                         f"{s['locality']:6.1f} {r.get('steps', ''):>6} {r['edit_seconds']:7.0f}")
    logger.info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    main()
