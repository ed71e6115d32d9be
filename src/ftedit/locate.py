"""Where to edit: trial edits over layers x module groups, ranked by edit score.

Each candidate (layer, module group) gets a short edit with the chosen recipe (augmentation off) on a sample
of records (for ``params.layers=auto``: the shipped calibration set, never the edits being placed), is evaluated with the harness (efficacy, generalization on paraphrases never trained on,
locality on neighbors), and is undone. ``exhaustive`` trains every candidate with the recipe's full budget;
``halving`` (successive halving) trains all candidates briefly and gives the larger budgets only to the best
1/eta of them, which costs about ``rungs / eta**(rungs-1)`` of the exhaustive sweep.

Candidates are ranked by the soft edit score (``locate.rank="soft"``, default): each prompt's success
indicator (new target more likely than the old one, or the reverse for neighbors) is replaced by the two-way
probability ``sigmoid(NLL margin)``. Short trials that moved the right way without flipping any prompt still
rank, and a small sample ranks with less noise than the 0/1 rates give.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ftedit.atomic import write_bytes_atomic, write_json_atomic
from ftedit.cache import cache_path
from ftedit.config import EditConfig, LocateConfig, resolve_config
from ftedit.data.requests import EditRequest, request_hash
from ftedit.errors import InputError, UsageError
from ftedit.evaluate.common import harmonic_mean, mean, percent
from ftedit.params import GROUPS, block_roles, find_blocks, parse_layers

logger = logging.getLogger(__name__)

METRICS = ("efficacy", "generalization", "locality", "edit_score")
SOFT_METRICS = ("soft_efficacy", "soft_generalization", "soft_locality", "soft_edit_score")
_KIND_METRIC = {"rewrite": "soft_efficacy", "paraphrase": "soft_generalization", "neighborhood": "soft_locality"}


@dataclass(frozen=True)
class Candidate:
    layer: int
    module: str  # a module group or role of params.expand_modules: "down", "attn", "block", ...

    @property
    def label(self) -> str:
        return f"{self.layer}:{self.module}"


@dataclass
class Trial:
    candidate: Candidate
    epochs: int
    metrics: dict[str, float]
    seconds: float


@dataclass
class SweepResult:
    strategy: str
    candidates: list[Candidate]
    trials: list[Trial]
    best: Candidate
    seconds: float
    n_edits: int
    cached: bool = False
    settings: dict[str, Any] = field(default_factory=dict)

    def best_metrics(self) -> dict[str, float]:
        return max((t for t in self.trials if t.candidate == self.best), key=lambda t: t.epochs).metrics

    def final_trials(self) -> list[Trial]:
        """Each candidate's trial at the largest budget it reached."""
        last: dict[Candidate, Trial] = {}
        for t in self.trials:
            if t.candidate not in last or t.epochs >= last[t.candidate].epochs:
                last[t.candidate] = t
        return list(last.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy, "n_edits": self.n_edits, "seconds": self.seconds, "settings": self.settings,
            "best": asdict(self.best), "best_metrics": self.best_metrics(),
            "trials": [{"layer": t.candidate.layer, "module": t.candidate.module, "epochs": t.epochs,
                        "seconds": t.seconds, **t.metrics} for t in self.trials],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepResult:
        trials = [Trial(Candidate(t["layer"], t["module"]), t["epochs"],
                        {m: t[m] for m in METRICS + SOFT_METRICS if m in t}, t["seconds"]) for t in data["trials"]]
        candidates = list(dict.fromkeys(t.candidate for t in trials))
        return cls(data["strategy"], candidates, trials, Candidate(**data["best"]), data["seconds"],
                   data["n_edits"], cached=True, settings=data.get("settings", {}))


def candidates_for(model: nn.Module, cfg: LocateConfig) -> list[Candidate]:
    """The (layer, module group) grid of ``cfg`` that this model actually has."""
    _, blocks = find_blocks(model)
    layers = parse_layers(cfg.layers, len(blocks))
    layers = sorted(layers[::-1][:: cfg.layer_stride])  # stride from the last layer, which is always a candidate
    groups = [g.strip() for g in cfg.modules.split(",") if g.strip()]
    out = []
    for layer in layers:
        present = block_roles(blocks[layer])
        for g in groups:
            roles = GROUPS.get(g, (g,))
            if g == "block" or any(r in present for r in roles):
                out.append(Candidate(layer, g))
    if not out:
        raise InputError(f"no candidate locations: layers {cfg.layers!r} x modules {cfg.modules!r}")
    return out


def sample_edits(requests: Sequence[EditRequest], cfg: LocateConfig) -> list[EditRequest]:
    requests = list(requests)
    if len(requests) <= cfg.n_edits:
        return requests
    return random.Random(cfg.seed).sample(requests, cfg.n_edits)


def trial_config(base: EditConfig, candidate: Candidate, epochs: int) -> EditConfig:
    """The recipe at one location and budget, without augmentation, as a mass edit of full weights.

    Where a model keeps its facts does not depend on how the edit is parametrized: a LoRA edit uses the location
    that full-weight trials find (a low-rank trial would measure the adapter's capacity as much as the place),
    so it shares their search, and a bundled model's shipped one."""
    cfg = copy.deepcopy(base)
    cfg.params.method = "full"
    cfg.params.layers = str(candidate.layer)
    cfg.params.modules = candidate.module
    cfg.mode = "mass"
    cfg.augment.n_paraphrases = cfg.augment.n_random = cfg.augment.n_similar = 0
    if cfg.train.pipeline == "depth":
        cfg.train.steps_per_edit = epochs
    else:
        cfg.train.epochs = epochs
    cfg.train.stop_margin = 0.0  # halving compares trials at fixed budgets
    return cfg


def full_budget(base: EditConfig) -> int:
    return base.train.steps_per_edit if base.train.pipeline == "depth" else base.train.epochs


def halving_budgets(total: int, eta: int, rungs: int) -> list[int]:
    """Budgets per rung, growing by ``eta`` and ending at ``total``: 25, eta 3, 3 rungs -> [3, 8, 25]."""
    return sorted({max(1, round(total / eta ** (rungs - 1 - r))) for r in range(rungs)})


def run_trial(model: nn.Module, tok, requests: list[EditRequest], base: EditConfig, candidate: Candidate,
              epochs: int) -> Trial:
    from ftedit.editor import edit
    from ftedit.evaluate import evaluate_requests

    start = time.perf_counter()
    result = edit(model, tok, requests, trial_config(base, candidate, epochs), progress=False)
    try:
        evaluated = evaluate_requests(result.model, tok, requests, details=True, progress=False)
    finally:
        result.restore()
    metrics = {m: float(evaluated.summary[m]) for m in METRICS} | soft_scores(evaluated.records)
    return Trial(candidate, epochs, metrics, time.perf_counter() - start)


def soft_scores(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """ES/PS/NS with each prompt's 0/1 success replaced by ``sigmoid(margin)``, the probability of the right
    answer of the two (the new target; the true one for neighbors) under their NLLs; x100, averaged per record
    and then over records like the harness's rates, and their harmonic mean."""
    out: dict[str, float] = {}
    for kind, name in _KIND_METRIC.items():
        sign = -1.0 if kind == "neighborhood" else 1.0
        per_record = [mean([_sigmoid(sign * (p["nll_true"] - p["nll_new"])) for p in rec[kind]["prompts"]])
                      for rec in records if rec.get(kind)]
        if not per_record:
            raise InputError(f"no {kind} prompts to score trial edits on")
        out[name] = percent(mean(per_record))
    out["soft_edit_score"] = harmonic_mean([out[m] for m in SOFT_METRICS[:3]])
    return out


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def rank_key(trial: Trial, rank: str = "soft") -> tuple[float, ...]:
    """Higher is better; ties broken by efficacy, then the earlier layer."""
    score = trial.metrics["soft_edit_score"] if rank == "soft" else trial.metrics["edit_score"]
    return score, trial.metrics["efficacy"], -trial.candidate.layer


def sweep(model: nn.Module, tok, requests: Sequence[EditRequest], base: EditConfig,
          locate: LocateConfig | None = None, progress: bool = True, model_fingerprint: str = "") -> SweepResult:
    """Run the search of ``locate`` (default ``base.locate``) on ``requests`` and return every trial and the best
    location. Results are cached under ``ftedit.cache.cache_dir()/locate`` when the model fingerprint is given and
    ``locate.cache`` is on, keyed by fingerprint, search settings and the sampled records.
    """
    locate = locate or base.locate
    sample = sample_edits(requests, locate)
    candidates = candidates_for(model, locate)
    settings = search_settings(base, locate)
    path = _cache_path(model_fingerprint, settings, sample)
    if model_fingerprint and locate.cache and path.is_file():
        logger.info("location search: cached result %s", path)
        return SweepResult.from_dict(json.loads(path.read_text()))

    start = time.perf_counter()
    total = full_budget(base)
    budgets = [total] if locate.strategy == "exhaustive" else halving_budgets(total, locate.eta, locate.rungs)
    survivors, trials = list(candidates), []
    bar = tqdm(total=_n_trials(len(candidates), budgets, locate.eta), desc="locate", disable=not progress)
    for i, epochs in enumerate(budgets):
        rung = []
        for c in survivors:
            rung.append(run_trial(model, tok, sample, base, c, epochs))
            bar.update(1)
            bar.set_postfix_str(f"{c.label} ep{epochs} score {rung[-1].metrics['edit_score']:.1f}")
        trials += rung
        rung.sort(key=lambda t: rank_key(t, locate.rank), reverse=True)
        if i < len(budgets) - 1:
            survivors = [t.candidate for t in rung[: math.ceil(len(rung) / locate.eta)]]
    bar.close()
    best = max((t for t in trials if t.epochs == budgets[-1]), key=lambda t: rank_key(t, locate.rank)).candidate
    result = SweepResult(locate.strategy, candidates, trials, best, time.perf_counter() - start, len(sample),
                         settings=settings)
    if model_fingerprint and locate.cache:
        write_json_atomic(path, result.to_dict())
    return result


#: Training options added after searches were shipped, at the value that switches them off: they do not
#: decide a trial, and leaving them out keeps the keys of earlier searches valid.
_NEUTRAL_TRAIN = {"threshold_check": "after", "stop_margin": 0.0, "fresh_optimizer_per_edit": False}
#: How a trial is computed, not what it trains (precision, cached or recomputed activations, checkpoints): one
#: canonical value in the key, so a bf16 run finds the search an fp32 run shipped.
_EXECUTION_ONLY = {"mixed_precision": "auto", "cache_activations": True, "gradient_checkpointing": False,
                   "checkpoint_every": 100}


def search_settings(base: EditConfig, locate: LocateConfig | None = None) -> dict[str, Any]:
    """What decides a search's outcome: the search grid and the trials' training, not the recipe's name, its
    augmentation (trials run without) or where it would train by hand. Recipes that train alike share a search."""
    search = asdict(locate or base.locate)
    search.pop("cache")
    trial = trial_config(base, Candidate(0, ""), full_budget(base)).to_dict()
    params = {k: v for k, v in trial["params"].items() if k not in ("layers", "modules")}
    # calibration is plain text; trials train no pool facts, so their loss does not decide a trial
    objective = {k: v for k, v in trial["objective"].items()
                 if k not in ("chat_template", "locality_loss", "locality_top_k")}
    train = {k: v for k, v in trial["train"].items() if k not in _NEUTRAL_TRAIN or _NEUTRAL_TRAIN[k] != v}
    train.update(_EXECUTION_ONLY)
    return {"locate": search, "objective": objective, "train": train, "params": params}


def settings_key(settings: dict[str, Any], calibration_sha256: str) -> str:
    payload = json.dumps({"settings": settings, "calibration": calibration_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _n_trials(n: int, budgets: list[int], eta: int) -> int:
    total = 0
    for _ in budgets:
        total += n
        n = math.ceil(n / eta)
    return total


def _cache_path(fingerprint: str, settings: dict[str, Any], sample: list[EditRequest]) -> Path:
    return cache_path("locate", model=fingerprint, settings=settings, edits=[request_hash(r) for r in sample])


# -- params.layers=auto: the calibration search -------------------------------------------------------------

LOCATIONS_FILE = "locations.json"  # shipped search results of the bundled models


def gguf_sha256(identity: Any) -> str:
    """The sha256 of the GGUF file a bundled or GGUF model was dequantized from ('' for other models)."""
    if identity is None or getattr(identity, "source", "") not in ("bundled", "gguf"):
        return ""
    marker = Path(identity.name_or_path) / "ftedit_source.json"
    return json.loads(marker.read_text()).get("sha256", "") if marker.is_file() else ""


def shipped_locations() -> dict[str, Any]:
    from ftedit.calibration import resource

    path = resource(LOCATIONS_FILE)
    return json.loads(path.read_text()) if path.is_file() else {}


def shipped_result(identity: Any, key: str) -> dict[str, Any] | None:
    """The shipped search of this bundled model's GGUF file under these settings, if the package has one."""
    digest = gguf_sha256(identity)
    entry = shipped_locations().get(f"{digest}:{key}") if digest else None
    return entry


def shipped_entry(model_name: str, digest: str, key: str, result: SweepResult) -> tuple[str, dict[str, Any]]:
    from ftedit.calibration import CALIBRATION_FILE

    return f"{digest}:{key}", {"model": model_name, "gguf_sha256": digest, "settings_key": key,
                               "calibration": CALIBRATION_FILE, "search": result.to_dict()}


def calibration_search(model: nn.Module, tok, config: EditConfig, progress: bool = True,
                       model_fingerprint: str = "", calibration: str | Path | None = None) -> SweepResult:
    """The location search of ``config`` on the calibration set (never on the edits it will place)."""
    from ftedit.calibration import calibration_path
    from ftedit.data.loaders import load_requests

    return sweep(model, tok, load_requests(calibration or calibration_path()).requests, config, progress=progress,
                 model_fingerprint=model_fingerprint)


def full_weight_twin(config: EditConfig) -> EditConfig:
    """The config whose search places ``config``: a LoRA edit of a recipe is placed where the recipe's
    full-weight edit goes (its learning rate and epochs, not the adapter's), so both share one search and a
    bundled model's shipped location. Other configs place themselves."""
    if config.params.method != "lora":
        return config
    from ftedit.config import recipe_names, resolve_config

    twin = resolve_config(config.recipe) if config.recipe in recipe_names() else copy.deepcopy(config)
    twin.params.method, twin.params.layers, twin.locate = "full", config.params.layers, config.locate
    return twin


def resolve_location(model: nn.Module, tok, config: EditConfig, identity: Any = None, progress: bool = True,
                     model_fingerprint: str = "", calibration: str | Path | None = None
                     ) -> tuple[EditConfig, dict[str, Any]]:
    """Resolve ``params.layers=auto``: the config with the chosen location, and a record for the manifest.

    The location is a property of the model: it comes from the search on the shipped calibration set
    (COUNTERFACT train split), taken from the package for the bundled models, else from the cache, else run
    now and cached. The edits themselves play no part. Configs with explicit layers pass through unchanged.
    """
    if config.params.layers != "auto":
        return config, {"source": "config"}
    from ftedit.calibration import calibration_path, calibration_sha256

    cal_file = str(calibration or calibration_path())
    searched = full_weight_twin(config)
    settings = search_settings(searched)
    key = settings_key(settings, calibration_sha256(cal_file))
    fingerprint = model_fingerprint or getattr(identity, "fingerprint", "")
    shipped = shipped_result(identity, key) if calibration is None else None
    if shipped:
        result, source = SweepResult.from_dict(shipped["search"]), "shipped"
        why = f"shipped calibration result for bundled model {shipped['model']!r} (same GGUF file and settings)"
    else:
        result = calibration_search(model, tok, searched, progress, fingerprint, calibration)
        source = "cached" if result.cached else "search"
        why = ("cached calibration search of this model" if result.cached else
               f"fresh calibration search ({result.seconds:.0f}s), now cached for this model")
    chosen = copy.deepcopy(config)
    chosen.params.layers, chosen.params.modules = str(result.best.layer), result.best.module
    logger.info("location: layer %d %s, from the %s (calibration trial edit score %.1f over %d candidates)",
                result.best.layer, result.best.module, why, result.best_metrics()["edit_score"], len(result.candidates))
    return chosen, {"source": source, "why": why, "layer": result.best.layer, "module": result.best.module,
                    "calibration": {"file": Path(cal_file).name, "sha256": calibration_sha256(cal_file),
                                    "n_sampled": result.n_edits},
                    "settings_key": key, "strategy": result.strategy, "n_candidates": len(result.candidates),
                    "seconds": result.seconds, "trial_metrics": result.best_metrics(),
                    "trials": table_rows(result)}


STRATEGIES = ("exhaustive", "halving", "both")


def run_sweeps(*, data, out: Path, model, recipe, overrides, strategy, n, offset, device, dtype,
               progress) -> dict[str, SweepResult]:
    """``ftedit locate``: load the model and edits, run the sweep(s) and write each report to ``out/<strategy>``."""
    from ftedit.data.loaders import load_requests
    from ftedit.models import load_model

    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy!r}: expected one of {STRATEGIES}")
    cfg = resolve_config(recipe, None, overrides)
    if n is not None:
        cfg.locate.n_edits = n
    loaded = load_requests(data, n=cfg.locate.n_edits, offset=offset)
    base, tok, identity = load_model(model, device=device, dtype=dtype)
    title = f"{identity.name_or_path.split('/')[-1]}, {len(loaded.requests)} edits, trials: {recipe}"
    results = {}
    for name in ("halving", "exhaustive") if strategy == "both" else (strategy,):
        settings = replace(cfg.locate, strategy=name)
        result = sweep(base, tok, loaded.requests, cfg, settings, progress=progress,
                       model_fingerprint=identity.fingerprint)
        write_report(Path(out) / name, result, identity.to_dict(), title)
        results[name] = result
    return results


def run_calibration_sweep(*, out: Path, model, recipe, overrides, strategy, n, device, dtype,
                          progress) -> tuple[SweepResult, dict[str, Any] | None]:
    """``ftedit locate --calibration``: the search of ``params.layers=auto`` rerun without the cache, its report
    written to ``out``; with the shipped entry of this (bundled) model under the same settings, if any."""
    from ftedit.calibration import calibration_sha256
    from ftedit.models import load_model

    cfg = resolve_config(recipe, None, overrides)
    if strategy:
        cfg.locate.strategy = strategy
    if n is not None:
        cfg.locate.n_edits = n
    cfg.validate()
    cfg.locate.cache = False
    base, tok, identity = load_model(model, device=device, dtype=dtype)
    result = calibration_search(base, tok, cfg, progress=progress)
    write_report(out, result, identity.to_dict(), f"{identity.spec}, calibration set, trials: {recipe}")
    return result, shipped_result(identity, settings_key(search_settings(cfg), calibration_sha256()))


# -- reports -------------------------------------------------------------------------------------------------


def table_rows(result: SweepResult) -> list[dict[str, Any]]:
    rows = [{"layer": t.candidate.layer, "module": t.candidate.module, "epochs": t.epochs,
             **{m: round(t.metrics[m], 2) for m in METRICS + SOFT_METRICS if m in t.metrics},
             "seconds": round(t.seconds, 1)}
            for t in result.trials]
    return sorted(rows, key=lambda r: (-r["epochs"], -r["edit_score"]))


def markdown_table(result: SweepResult) -> str:
    head = ("| layer | module | epochs | ES | PS | NS | score | soft score | s |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['layer']} | {r['module']} | {r['epochs']} | {r['efficacy']:.1f} | "
                   f"{r['generalization']:.1f} | {r['locality']:.1f} | {r['edit_score']:.1f} | "
                   f"{r.get('soft_edit_score', float('nan')):.1f} | {r['seconds']:.0f} |\n"
                   for r in table_rows(result))
    return head + body


def csv_table(result: SweepResult) -> str:
    rows = table_rows(result)
    cols = list(rows[0])
    return "\n".join([",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]) + "\n"


def heatmap_png(result: SweepResult, title: str = "") -> bytes:
    """Layer x module heatmap of edit score at each candidate's largest budget (blank: pruned early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({c.layer for c in result.candidates})
    modules = list(dict.fromkeys(c.module for c in result.candidates))
    final_budget = max(t.epochs for t in result.trials)
    grid = np.full((len(layers), len(modules)), np.nan)
    budget = np.zeros_like(grid)
    for t in result.final_trials():
        cell = layers.index(t.candidate.layer), modules.index(t.candidate.module)
        grid[cell], budget[cell] = t.metrics["edit_score"], t.epochs
    fig, ax = plt.subplots(figsize=(1.3 * len(modules) + 2.5, 0.38 * len(layers) + 1.8))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            mark = "" if budget[i, j] == final_budget else "*"
            ax.text(j, i, f"{v:.0f}{mark}", ha="center", va="center", fontsize=8,
                    color="white" if v < np.nanmax(grid) * 0.7 else "black")
    best = result.best
    ax.add_patch(plt.Rectangle((modules.index(best.module) - 0.5, layers.index(best.layer) - 0.5), 1, 1,
                               fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(modules)), modules)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    note = " (* = pruned before the full budget)" if result.strategy == "halving" else ""
    ax.set_title((title + "\n" if title else "") + f"edit score, {result.strategy} sweep{note}", fontsize=9)
    fig.colorbar(image, ax=ax, label="edit score")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_report(out_dir: str | Path, result: SweepResult, identity: dict[str, Any] | None = None,
                 title: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", {"model": identity, **result.to_dict()})
    write_bytes_atomic(out / "sweep.md", markdown_table(result).encode())
    write_bytes_atomic(out / "sweep.csv", csv_table(result).encode())
    write_bytes_atomic(out / "heatmap.png", heatmap_png(result, title))
    return out
