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

from ftedit.config import DEFAULT_RECIPE, EditConfig
from ftedit.data.loaders import load_pool_facts, load_requests
from ftedit.data.requests import EditRequest
from ftedit.errors import InputError, UsageError
from ftedit.methods import apply_spec
from ftedit.registry import ApplyContext, get_method
from ftedit.retention.filtering import MentionFilter, edit_terms
from ftedit.retention.finetune import DownstreamConfig, finetune
from ftedit.retention.freezing import touched_modules
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
from ftedit.retention.protection import build_protection, evaluation_prompts, rehearsal_pairs
from ftedit.retention.stats import pooled_statistics, run_statistics
from ftedit.retention.tasks import DownstreamTask, TaskConfig, build_task

logger = logging.getLogger(__name__)

PROTOCOLS = ("mass", "single")


@dataclass
class StudyConfig:
    tasks: list[TaskConfig]  # downstream tasks, each run under every strategy; each needs a threshold
    intrinsic_pool: str  # facts (COUNTERFACT/ZsRE/JSONL) to draw intrinsic probes and related objects from
    edits: str | None = None  # edit requests file; None with from_edit (the manifest lists the edits)
    n_edits: int | None = 50
    offset: int = 0
    # names of ftedit.methods.method_names(); each edits the base model in turn, then runs every (task, strategy)
    methods: list[str] = field(default_factory=lambda: [DEFAULT_RECIPE])
    # method overrides, e.g. ["train.epochs=10"]; "NAME:field=value" applies to method NAME only
    overrides: list[str] = field(default_factory=list)
    method_pool: str | None = None  # fact pool for recipes with random/similar augmentation
    from_edit: str | None = None  # output folder of `ftedit edit`: start from its edited model and manifest
    strategies: list[str] = field(default_factory=lambda: ["none", "edits"])  # see ftedit.retention.protection
    protocol: str = "mass"  # "mass" or "single"
    n_intrinsic: int = 50
    margin: float = 0.1  # select_known_facts margin (paper 002, App. A)
    filter_intrinsic: bool = False  # also drop downstream texts naming intrinsic subjects/objects (paper's App. C)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    seed: int = 0

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise InputError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not self.tasks or not self.strategies or not self.methods:
            raise InputError("a study needs at least one downstream task, one method and one strategy")
        if self.from_edit and (self.protocol == "single" or len(self.methods) > 1):
            raise InputError("--from-edit holds one (mass) edit by one method; drop --protocol single and extra "
                             "--method options")
        named = {o.partition("=")[0].partition(":")[0] for o in self.overrides if ":" in o.partition("=")[0]}
        if named - set(self.methods):
            raise InputError(f"--set names methods not in the study: {sorted(named - set(self.methods))} "
                             f"(methods: {self.methods})")
        missing = [t.kind for t in self.tasks if t.threshold is None]
        if missing:
            raise InputError(f"every downstream run stops by its task's threshold; give one for {missing} "
                             "(--threshold KIND=VALUE or KIND=rel:FACTOR)")


@dataclass
class Prepared:
    """Everything measured on the base model before editing."""

    requests: list[EditRequest]
    probes: list[RetentionProbe]
    tasks: list[DownstreamTask]
    base: RetentionSnapshot
    related: dict
    info: dict[str, Any]
    excluded: set[str]  # evaluation prompts rehearsal must never train on


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
    excluded = evaluation_prompts(requests, [p.prompt for p in probes if p.kind != "edited"])
    return Prepared(list(requests), probes, tasks, base, related_objects(probes, pool), info, excluded)


def _curve(snaps: Sequence[RetentionSnapshot], probes: Sequence[RetentionProbe]) -> list[dict[str, Any]]:
    return [{"step": s.step, "label": s.label, "edited": s.rate(probes, "edited"),
             "paraphrase": s.rate(probes, "paraphrase"), "intrinsic": s.rate(probes, "intrinsic")} for s in snaps]


@dataclass
class EditedModel:
    """One method's edit, ready for its downstream runs."""

    method: str
    model: nn.Module
    touched: list[dict[str, Any]]
    state: dict[str, torch.Tensor]
    post: RetentionSnapshot
    rehearse: list[tuple[str, str]]  # the edits' training pairs (only when a strategy rehearses)


def _uses_rehearsal(strategies: Sequence[str]) -> bool:
    return any(part.strip().partition(":")[0] == "rehearsal" for s in strategies for part in s.split("+"))


def _log_run(name: str, log, rule, stats: dict[str, Any]) -> None:
    retained = {k: round(v["rate"], 1) for k, v in stats["retention"].items()}
    logger.info("%s: stopped by %s after %d steps (%s %.4f); retained %s", name, log.stopped_by, log.steps,
                rule.metric, log.validation[-1][1], retained)
    if log.stopped_by == "max_steps":
        logger.warning("%s: the step cap (%d) stopped the run before the threshold (%s %s)", name, rule.max_steps,
                       rule.direction, rule.threshold)


def _one_run(edited: EditedModel, tok, task: DownstreamTask, strategy: str, probes, cfg: StudyConfig,
             related) -> dict[str, Any]:
    model = edited.model
    _reset(model, edited.state)
    protection = build_protection(model, strategy, edited.touched, rehearse=edited.rehearse, seed=cfg.seed)
    snaps = [edited.post]
    rule = task.config.stopping(cfg.downstream.max_steps, cfg.downstream.eval_every)
    described = protection.describe()
    try:
        log = finetune(model, task, rule, cfg.downstream, protection=protection,
                       on_checkpoint=lambda step: snaps.append(measure(model, tok, probes, f"step {step}", step)))
    finally:
        protection.undo()
    lost = lost_edits(probes, edited.post, snaps[-1], tok, related)
    stats = run_statistics(tok, probes, edited.post, snaps[-1], seed=cfg.seed)
    _log_run(f"{edited.method} / {task.config.kind} / {strategy}", log, rule, stats)
    return {"method": edited.method, "task": task.config.kind, "strategy": strategy,
            "frozen_parameters": described["frozen_parameters"], "protection": described,
            "anchor_distance": protection.anchor.distance() if protection.anchor is not None else None,
            "log": log.to_dict(), "final_metric": log.validation[-1][1], "curve": _curve(snaps, probes),
            "snapshots": [s.to_dict() for s in snaps], "lost_edits": lost,
            "fallback": dict(Counter(x["fallback"] for x in lost)), **stats}


def _overrides_for(method: str, overrides: Sequence[str]) -> list[str]:
    """Unprefixed overrides, and ``method:field=value`` ones with the prefix removed."""
    out = []
    for o in overrides:
        head, sep, _ = o.partition("=")
        name, colon, rest = head.partition(":")
        if not (sep and colon):
            out.append(o)
        elif name == method:
            out.append(rest + o[len(head):])
    return out


def _method_pool(spec, config, cfg: StudyConfig, probe_prompts: set[str]):
    """The fact pool the method trains with, as ``ftedit edit`` finds it (--pool, else the recipe's own), less
    any fact the study probes."""
    source = cfg.method_pool or (config.augment.pool if isinstance(config, EditConfig) else None)
    if not source or not spec.capabilities.pool:
        return None
    return [f for f in load_pool_facts(source) if f.prompt not in probe_prompts]


def _edit(method: str, cfg: StudyConfig, model, tok, requests, probe_prompts: set[str], progress: bool,
          identity=None):
    """Edit in place as ``ftedit edit`` would: ``params.layers=auto`` resolved by ftedit.locate."""
    spec = get_method(method)
    config = spec.resolve_config(None, _overrides_for(method, cfg.overrides))
    context = ApplyContext(pool=_method_pool(spec, config, cfg, probe_prompts), progress=progress,
                           identity=identity, model_fingerprint=getattr(identity, "fingerprint", "") or "")
    applied = apply_spec(spec, config, model, tok, list(requests), context)
    return applied.merged_model(), applied


def _edit_info(method: str, applied) -> dict[str, Any]:
    return {"method": method, "seconds": applied.seconds, "config": applied.config,
            "location": getattr(applied, "location", None), "touched": applied.touched_dicts()}


def _prepare_edit(cfg: StudyConfig, method: str, model, tok, prep: Prepared, requests, probes, progress: bool,
                  identity=None) -> tuple[EditedModel, dict[str, Any]]:
    prompts = {p.prompt for p in prep.probes}
    edited, applied = _edit(method, cfg, model, tok, requests, prompts, progress, identity)
    info = _edit_info(method, applied)
    rehearse = rehearsal_pairs(requests, prep.excluded) if _uses_rehearsal(cfg.strategies) else []
    post = measure(edited, tok, probes, "post-edit", 0)
    return EditedModel(method, edited, info["touched"], _state(edited), post, rehearse), info


def _from_manifest(cfg: StudyConfig, method: str, model, tok, prep: Prepared,
                   manifest: dict[str, Any]) -> tuple[EditedModel, dict[str, Any]]:
    """An ``ftedit edit`` output's model, already edited: its manifest says what it touched."""
    touched = touched_modules(manifest)
    rehearse = rehearsal_pairs(prep.requests, prep.excluded) if _uses_rehearsal(cfg.strategies) else []
    post = measure(model, tok, prep.probes, "post-edit", 0)
    location = (manifest.get("touched") or {}).get("location") if isinstance(manifest.get("touched"), dict) else None
    info = {"method": method, "from_edit": cfg.from_edit, "touched": touched, "location": location}
    return EditedModel(method, model, touched, _state(model), post, rehearse), info


@dataclass
class Finished:
    """What an interrupted study (its ``result.json``) already holds: a resumed study takes these runs over."""

    runs: dict[tuple[str, str, str], dict[str, Any]]  # (method, task kind, strategy) -> run
    edits: dict[str, dict[str, Any]]  # method -> edit info
    post_edit: dict[str, dict[str, Any]]  # method -> post-edit snapshot

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> Finished:
        return cls({(r["method"], r["task"], r["strategy"]): r for r in result.get("runs", [])},
                   {e["method"]: e for e in result.get("edits", [])}, dict(result.get("post_edit", {})))


def run_mass(cfg: StudyConfig, model, tok, prep: Prepared, manifest: dict[str, Any] | None, progress: bool,
             on_run: Callable[[dict[str, Any]], None] | None = None, identity=None,
             finished: Finished | None = None) -> dict[str, Any]:
    """Every method edits the base model in turn (or ``manifest``'s edit is given); all runs start from it.

    ``finished``: runs of an interrupted study, taken over as they are. A method whose runs are all there is
    not edited again; otherwise its edit is redone (same seed) and only the missing runs are run.
    """
    outcome: dict[str, Any] = {"edits": [], "post_edit": {}, "runs": []}
    done = finished or Finished({}, {}, {})
    base_state = _state(model) if manifest is None and len(cfg.methods) > 1 else None
    for method in cfg.methods:
        # Strategy-major order: an interrupted study has already covered every task for the first strategies.
        keys = [(method, task.config.kind, s) for s in cfg.strategies for task in prep.tasks]
        if method in done.edits and all(k in done.runs for k in keys):
            logger.info("%s: all %d runs taken over from the interrupted study", method, len(keys))
            outcome["edits"].append(done.edits[method])
            outcome["post_edit"][method] = done.post_edit[method]
            outcome["runs"] += [done.runs[k] for k in keys]
            if on_run is not None:
                on_run(outcome)
            continue
        if manifest is not None:
            edited, info = _from_manifest(cfg, method, model, tok, prep, manifest)
        else:
            if base_state is not None:
                _reset(model, base_state)
            edited, info = _prepare_edit(cfg, method, model, tok, prep, prep.requests, prep.probes, progress,
                                         identity)
        outcome["edits"].append(info)
        outcome["post_edit"][method] = edited.post.to_dict()
        reused = sum(k in done.runs for k in keys)
        if reused:
            logger.info("%s: edit redone; %d of %d runs taken over from the interrupted study", method, reused,
                        len(keys))
        for s in cfg.strategies:
            for task in prep.tasks:
                key = (method, task.config.kind, s)
                run = done.runs.get(key) or _one_run(edited, tok, task, s, prep.probes, cfg, prep.related)
                outcome["runs"].append(run)
                if on_run is not None:
                    on_run(outcome)
    return outcome


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _aggregate(per_edit: list[dict[str, Any]], probe_every: int, seed: int) -> dict[str, Any]:
    """Average single-edit runs of one (method, task, strategy); a run that stopped early keeps its final value."""
    last = max(r["log"]["steps"] for r in per_edit)
    grid = sorted({0, last} | set(range(probe_every, last + 1, probe_every)))
    curve = []
    for step in grid:
        at = [max((c for c in r["curve"] if c["step"] <= step), key=lambda c: c["step"]) for r in per_edit]
        curve.append({"step": step, "label": f"step {step}" if step else "post-edit",
                      **{k: _mean([c[k] for c in at]) for k in ("edited", "paraphrase", "intrinsic")}})
    lost = [x for r in per_edit for x in r["lost_edits"]]
    stopped = Counter(r["log"]["stopped_by"] for r in per_edit)
    first = per_edit[0]
    return {"method": first["method"], "task": first["task"], "strategy": first["strategy"],
            "frozen_parameters": first["frozen_parameters"], "protection": first["protection"],
            "log": {"steps": _mean([r["log"]["steps"] for r in per_edit]), "stopped_by": dict(stopped),
                    "validation": first["log"]["validation"], "runs": len(per_edit),
                    "trainable_parameters": first["log"]["trainable_parameters"]},
            "final_metric": _mean([r["final_metric"] for r in per_edit]),
            "curve": curve, "lost_edits": lost, "fallback": dict(Counter(x["fallback"] for x in lost)),
            **pooled_statistics(per_edit, seed),
            "per_edit": [{k: r[k] for k in ("log", "curve", "snapshots", "lost_edits")} for r in per_edit]}


def run_single(cfg: StudyConfig, model, tok, prep: Prepared, progress: bool,
               on_run: Callable[[dict[str, Any]], None] | None = None, identity=None) -> dict[str, Any]:
    """Each edit alone on the base weights, then every (task, strategy) run; per method."""
    base_state = _state(model)
    intrinsic = [p for p in prep.probes if p.kind == "intrinsic"]
    per_run: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    edits: dict[str, dict[str, Any]] = {}
    posts: dict[str, list[dict[str, Any]]] = {}
    for method in cfg.methods:
        for i, request in enumerate(prep.requests):
            _reset(model, base_state)
            probes = [p for p in prep.probes if p.edit == i] + intrinsic
            edited, info = _prepare_edit(cfg, method, model, tok, prep, [request], probes, False, identity)
            summary = edits.setdefault(method, {**info, "seconds": 0.0, "edits_done": 0})
            summary.update(seconds=summary["seconds"] + info["seconds"], edits_done=i + 1, touched=info["touched"])
            posts.setdefault(method, []).append(edited.post.to_dict())
            for task in prep.tasks:
                for s in cfg.strategies:
                    run = _one_run(edited, tok, task, s, probes, cfg, prep.related)
                    per_run.setdefault((method, task.config.kind, s), []).append(run)
            logger.info("single-edit protocol, %s: edit %d/%d done", method, i + 1, len(prep.requests))
            outcome = {"edits": list(edits.values()), "post_edit": posts,
                       "runs": [_aggregate(v, cfg.downstream.probe_every, cfg.seed) for v in per_run.values()]}
            if on_run is not None:
                on_run(outcome)
    return outcome


def cap_stopped(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs (or, single protocol, how many of a run's edits) that the step cap stopped."""
    out = []
    for r in runs:
        stopped = r["log"]["stopped_by"]
        n = stopped.get("max_steps", 0) if isinstance(stopped, dict) else int(stopped == "max_steps")
        if n:
            out.append({"method": r["method"], "task": r["task"], "strategy": r["strategy"], "runs": n,
                        "steps": r["log"]["steps"], "final_metric": r["final_metric"]})
    return out


def load_edit_requests(cfg: StudyConfig, manifest: dict[str, Any] | None) -> list[EditRequest]:
    if manifest is not None:
        return [EditRequest.from_dict(e) for e in manifest["edits"]]
    if not cfg.edits:
        raise InputError("give the edit requests (--edits FILE) or an edited output folder (--from-edit DIR)")
    loaded = load_requests(cfg.edits, n=cfg.n_edits, offset=cfg.offset, skip_invalid=True)
    for issue in loaded.skipped:
        logger.warning("skipped edit: %s", issue)
    return loaded.requests


def run_study(cfg: StudyConfig, base_model: nn.Module, tok, *, edited_model: nn.Module | None = None,
              manifest: dict[str, Any] | None = None, progress: bool = True,
              on_partial: Callable[[dict[str, Any]], None] | None = None, identity=None,
              finished: Finished | None = None) -> dict[str, Any]:
    """Run the whole study; returns the result dict that :func:`ftedit.retention.report.write_report` writes.

    ``on_partial`` receives the result so far (``"complete": False``) after every finished run, e.g. to write
    an interim report that survives an interrupted study.

    ``base_model`` is edited in place (mass protocol without ``edited_model``). With ``edited_model`` and its
    ``manifest`` (from ``ftedit edit``), the base model is only measured and the edit is not redone.
    ``identity`` (the base model's ModelIdentity) lets ``params.layers=auto`` find a bundled model's shipped
    location, as ``ftedit edit`` does. ``finished``: the runs of an interrupted study to take over (mass
    protocol only; see :func:`run_mass`).
    """
    if finished is not None and cfg.protocol == "single":
        raise UsageError("a single-protocol study cannot be resumed (its runs are averaged over the edits as they "
                         "go); start it over with --overwrite")
    start = time.perf_counter()
    requests = load_edit_requests(cfg, manifest)
    prep = prepare(cfg, base_model, tok, requests)

    def result(outcome: dict[str, Any], complete: bool) -> dict[str, Any]:
        return {"config": asdict(cfg), "protocol": cfg.protocol, "n_edits": len(requests),
                "n_intrinsic": sum(p.kind == "intrinsic" for p in prep.probes), **prep.info,
                "fallback_classes": list(FALLBACKS), "tasks": [t.summary() for t in prep.tasks],
                "probes": [asdict(p) for p in prep.probes], "base": prep.base.to_dict(), **outcome,
                "cap_stopped": cap_stopped(outcome["runs"]), "complete": complete,
                "wall_seconds": time.perf_counter() - start}

    def partial(outcome: dict[str, Any]) -> None:
        if on_partial is not None:  # a copy of the run list: the study keeps appending to its own
            on_partial(result({**outcome, "runs": list(outcome["runs"])}, False))

    if cfg.protocol == "single":
        outcome = run_single(cfg, base_model, tok, prep, progress, partial, identity)
    elif edited_model is not None:
        outcome = run_mass(cfg, edited_model, tok, prep, manifest, progress, partial, finished=finished)
    else:
        outcome = run_mass(cfg, base_model, tok, prep, None, progress, partial, identity, finished)
    return result(outcome, True)
