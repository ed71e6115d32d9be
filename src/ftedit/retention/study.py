"""The retention study (paper 002): edit, then fine-tune downstream under each freezing strategy, and track
how much edited and intrinsic knowledge survives.

Mass protocol (default): all edits at once, then one downstream run per (task, strategy), each starting from
the same edited weights. Single protocol (the paper's): each edit alone on the base model, then one run per
(task, strategy); curves average over edits.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ftedit.data.loaders import load_pool_facts, load_requests
from ftedit.data.requests import EditRequest
from ftedit.methods import apply_method
from ftedit.retention.filtering import MentionFilter, edit_terms
from ftedit.retention.finetune import DownstreamConfig, finetune
from ftedit.retention.freezing import apply_strategy, touched_modules
from ftedit.retention.measure import (
    FALLBACKS,
    RetentionProbe,
    RetentionSnapshot,
    edited_probes,
    lost_edits,
    measure,
    related_objects,
    select_intrinsic,
)
from ftedit.retention.tasks import DownstreamTask, TaskConfig, build_task

logger = logging.getLogger(__name__)

PROTOCOLS = ("mass", "single")


@dataclass
class StudyConfig:
    tasks: list[TaskConfig]  # downstream tasks, each run under every strategy
    intrinsic_pool: str  # facts (COUNTERFACT/ZsRE/JSONL) to draw intrinsic probes and related objects from
    edits: str | None = None  # edit requests file; None with from_edit (the manifest lists the edits)
    n_edits: int | None = 50
    offset: int = 0
    method: str = "locft-bf"  # any name of ftedit.methods.method_names()
    overrides: list[str] = field(default_factory=list)  # recipe overrides, e.g. ["train.epochs=10"]
    method_pool: str | None = None  # fact pool for recipes with random/similar augmentation
    from_edit: str | None = None  # output folder of `ftedit edit`: start from its edited model and manifest
    strategies: list[str] = field(default_factory=lambda: ["none", "edits"])
    protocol: str = "mass"  # "mass" or "single"
    n_intrinsic: int = 50
    margin: float = 0.1  # select_known_facts margin (paper 002, App. A)
    filter_intrinsic: bool = False  # also drop downstream texts naming intrinsic subjects/objects (paper's App. C)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    seed: int = 0

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not self.tasks or not self.strategies:
            raise ValueError("a study needs at least one downstream task and one freezing strategy")
        if self.from_edit and self.protocol == "single":
            raise ValueError("--from-edit holds one (mass) edit; the single protocol edits each fact itself")


@dataclass
class Prepared:
    """Everything measured on the base model before editing."""

    requests: list[EditRequest]
    probes: list[RetentionProbe]
    tasks: list[DownstreamTask]
    base: RetentionSnapshot
    related: dict
    info: dict[str, Any]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reset(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(True)  # editors freeze all but their targets; downstream starts from a trainable model


def prepare(cfg: StudyConfig, base_model: nn.Module, tok, requests: Sequence[EditRequest]) -> Prepared:
    pool = load_pool_facts(cfg.intrinsic_pool, skip_invalid=True)
    intrinsic, selection = select_intrinsic(base_model, tok, pool, requests, cfg.n_intrinsic, cfg.margin, cfg.seed)
    if len(intrinsic) < cfg.n_intrinsic:
        logger.warning("only %d intrinsic facts found (asked for %d): %s", len(intrinsic), cfg.n_intrinsic, selection)
    probes = edited_probes(requests) + intrinsic
    terms = edit_terms(requests)
    if cfg.filter_intrinsic:
        terms += [p.subject for p in intrinsic] + [p.target for p in intrinsic]
    mention = MentionFilter(terms)
    exclude = {p.prompt for p in probes}
    tasks = [build_task(t, tok, mention, base_model=base_model, exclude_prompts=exclude) for t in cfg.tasks]
    for t in tasks:
        t.resolve_threshold(base_model)
        logger.info("task %s: %d train / %d val, %d records removed by the edit filter; stop at %s %s %s",
                    t.config.kind, len(t.train_items), len(t.val_items), t.removed, *t.summary_stop())
    base = measure(base_model, tok, probes, "base", -1)
    info = {"intrinsic_selection": selection, "filter_terms": len(mention.terms)}
    return Prepared(list(requests), probes, tasks, base, related_objects(probes, pool), info)


def _curve(snaps: Sequence[RetentionSnapshot], probes: Sequence[RetentionProbe]) -> list[dict[str, Any]]:
    return [{"step": s.step, "label": s.label, "edited": s.rate(probes, "edited"),
             "intrinsic": s.rate(probes, "intrinsic")} for s in snaps]


def _one_run(model, tok, task: DownstreamTask, strategy: str, touched, probes, post: RetentionSnapshot,
             edited_state, cfg: StudyConfig, related) -> dict[str, Any]:
    _reset(model, edited_state)
    handle = apply_strategy(model, strategy, touched)
    snaps = [post]
    rule = task.config.stopping(cfg.downstream.max_steps, cfg.downstream.eval_every)
    try:
        log = finetune(model, task, rule, cfg.downstream,
                       on_checkpoint=lambda step: snaps.append(measure(model, tok, probes, f"step {step}", step)))
    finally:
        frozen = handle.n_frozen
        handle.undo()
    lost = lost_edits(probes, post, snaps[-1], tok, related)
    logger.info("%s / %s: stopped by %s after %d steps; edited %.1f%% -> %.1f%%, intrinsic %.1f%% -> %.1f%%",
                task.config.kind, strategy, log.stopped_by, log.steps, post.rate(probes, "edited") or 0,
                snaps[-1].rate(probes, "edited") or 0, post.rate(probes, "intrinsic") or 0,
                snaps[-1].rate(probes, "intrinsic") or 0)
    return {"task": task.config.kind, "strategy": strategy, "frozen_parameters": frozen, "log": log.to_dict(),
            "curve": _curve(snaps, probes), "snapshots": [s.to_dict() for s in snaps], "lost_edits": lost,
            "fallback": dict(Counter(x["fallback"] for x in lost))}


def _edit(cfg: StudyConfig, model, tok, requests, pool, progress: bool):
    applied = apply_method(cfg.method, model, tok, requests, overrides=cfg.overrides, pool=pool, progress=progress)
    return applied.merged_model(), applied


def run_mass(cfg: StudyConfig, model, tok, prep: Prepared, touched, progress: bool,
             on_run: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """All runs from one edited model (already edited when ``touched`` is given)."""
    edit_info: dict[str, Any] = {"method": cfg.method, "from_edit": cfg.from_edit}
    if touched is None:
        pool = load_pool_facts(cfg.method_pool) if cfg.method_pool else None
        model, applied = _edit(cfg, model, tok, prep.requests, pool, progress)
        touched = applied.touched_dicts()
        edit_info.update(seconds=applied.seconds, config=applied.config)
    edit_info["touched"] = touched_modules(touched)
    post = measure(model, tok, prep.probes, "post-edit", 0)
    state = _state(model)
    outcome: dict[str, Any] = {"edit": edit_info, "post_edit": post.to_dict(), "runs": []}
    # Strategy-major order: an interrupted study has already covered every task for the first strategies.
    for s in cfg.strategies:
        for task in prep.tasks:
            outcome["runs"].append(_one_run(model, tok, task, s, touched, prep.probes, post, state, cfg, prep.related))
            if on_run is not None:
                on_run(outcome)
    return outcome


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _aggregate(per_edit: list[dict[str, Any]], probe_every: int) -> dict[str, Any]:
    """Average single-edit runs of one (task, strategy); a run that stopped early keeps its final value."""
    last = max(r["log"]["steps"] for r in per_edit)
    grid = sorted({0, last} | set(range(probe_every, last + 1, probe_every)))
    curve = []
    for step in grid:
        at = [max((c for c in r["curve"] if c["step"] <= step), key=lambda c: c["step"]) for r in per_edit]
        curve.append({"step": step, "label": f"step {step}" if step else "post-edit",
                      "edited": _mean([c["edited"] for c in at]), "intrinsic": _mean([c["intrinsic"] for c in at])})
    lost = [x for r in per_edit for x in r["lost_edits"]]
    stopped = Counter(r["log"]["stopped_by"] for r in per_edit)
    return {"task": per_edit[0]["task"], "strategy": per_edit[0]["strategy"],
            "frozen_parameters": per_edit[0]["frozen_parameters"],
            "log": {"steps": _mean([r["log"]["steps"] for r in per_edit]), "stopped_by": dict(stopped),
                    "validation": per_edit[0]["log"]["validation"], "runs": len(per_edit),
                    "trainable_parameters": per_edit[0]["log"]["trainable_parameters"]},
            "curve": curve, "lost_edits": lost, "fallback": dict(Counter(x["fallback"] for x in lost)),
            "per_edit": [{k: r[k] for k in ("log", "curve", "snapshots", "lost_edits")} for r in per_edit]}


def run_single(cfg: StudyConfig, model, tok, prep: Prepared, progress: bool,
               on_run: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Each edit alone on the base weights, then every (task, strategy) run."""
    base_state = _state(model)
    pool = load_pool_facts(cfg.method_pool) if cfg.method_pool else None
    intrinsic = [p for p in prep.probes if p.kind == "intrinsic"]
    per_pair: dict[tuple[str, str], list[dict[str, Any]]] = {}
    posts, seconds = [], 0.0
    for i, request in enumerate(prep.requests):
        _reset(model, base_state)
        edited, applied = _edit(cfg, model, tok, [request], pool, progress=False)
        seconds += applied.seconds
        probes = [prep.probes[i]] + intrinsic
        post = measure(edited, tok, probes, "post-edit", 0)
        posts.append(post.to_dict())
        state = _state(edited)
        for task in prep.tasks:
            for s in cfg.strategies:
                run = _one_run(edited, tok, task, s, applied.touched_dicts(), probes, post, state, cfg, prep.related)
                per_pair.setdefault((task.config.kind, s), []).append(run)
        logger.info("single-edit protocol: edit %d/%d done", i + 1, len(prep.requests))
        outcome = {"edit": {"method": cfg.method, "seconds": seconds, "touched": applied.touched_dicts(),
                            "edits_done": i + 1}, "post_edit": posts,
                   "runs": [_aggregate(v, cfg.downstream.probe_every) for v in per_pair.values()]}
        if on_run is not None:
            on_run(outcome)
    return outcome


def load_edit_requests(cfg: StudyConfig, manifest: dict[str, Any] | None) -> list[EditRequest]:
    if manifest is not None:
        return [EditRequest.from_dict(e) for e in manifest["edits"]]
    if not cfg.edits:
        raise ValueError("give the edit requests (--edits FILE) or an edited output folder (--from-edit DIR)")
    loaded = load_requests(cfg.edits, n=cfg.n_edits, offset=cfg.offset, skip_invalid=True)
    for issue in loaded.skipped:
        logger.warning("skipped edit: %s", issue)
    return loaded.requests


def run_study(cfg: StudyConfig, base_model: nn.Module, tok, *, edited_model: nn.Module | None = None,
              manifest: dict[str, Any] | None = None, progress: bool = True,
              on_partial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the whole study; returns the result dict that :func:`ftedit.retention.report.write_report` writes.

    ``on_partial`` receives the result so far (``"complete": False``) after every finished run, e.g. to write
    an interim report that survives an interrupted study.

    ``base_model`` is edited in place (mass protocol without ``edited_model``). With ``edited_model`` and its
    ``manifest`` (from ``ftedit edit``), the base model is only measured and the edit is not redone.
    """
    start = time.perf_counter()
    requests = load_edit_requests(cfg, manifest)
    prep = prepare(cfg, base_model, tok, requests)

    def result(outcome: dict[str, Any], complete: bool) -> dict[str, Any]:
        return {"config": asdict(cfg), "protocol": cfg.protocol, "n_edits": len(requests),
                "n_intrinsic": sum(p.kind == "intrinsic" for p in prep.probes), **prep.info,
                "fallback_classes": list(FALLBACKS), "tasks": [t.summary() for t in prep.tasks],
                "probes": [asdict(p) for p in prep.probes], "base": prep.base.to_dict(), **outcome,
                "complete": complete, "wall_seconds": time.perf_counter() - start}

    def partial(outcome: dict[str, Any]) -> None:
        if on_partial is not None:  # a copy of the run list: the study keeps appending to its own
            on_partial(result({**outcome, "runs": list(outcome["runs"])}, False))

    if cfg.protocol == "single":
        outcome = run_single(cfg, base_model, tok, prep, progress, partial)
    elif edited_model is not None:
        outcome = run_mass(cfg, edited_model, tok, prep, manifest, progress, partial)
    else:
        outcome = run_mass(cfg, base_model, tok, prep, None, progress, partial)
    return result(outcome, True)
