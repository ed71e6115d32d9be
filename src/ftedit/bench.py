"""``ftedit bench``: several editing methods on one model and one set of edits, measured by one harness.

Every entry ("LABEL=METHOD[:key=value,...]") is applied to the same base model and the same edits through
:func:`ftedit.methods.apply_method`, evaluated with :func:`ftedit.evaluate.evaluate_requests` (one tokenization,
one metric code for all) and undone before the next entry. An "unedited" row is the reference.

Isolation (the default): each entry runs in a fresh Python process that loads the model itself. Its own
``ru_maxrss`` is then that method's peak memory (model + edit + evaluation; the "unedited" row's peak is the
load-and-evaluate baseline), and one method crashing or leaking cannot disturb the next. On CUDA the worker also
records ``torch.cuda.max_memory_allocated`` around the edit and the evaluation. ``--no-isolate`` runs everything
in one process on one loaded model (faster for tiny models; CPU peak memory is then not per method).

Resumable: each finished entry is written atomically to ``OUT/results/<label>.json`` with a hash of everything
that determines its numbers (model identity, data, n/offset, method, overrides and resolved recipe config, pool,
evaluation settings). A rerun reuses results whose hash matches and recomputes the others.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftedit.atomic import write_bytes_atomic, write_json_atomic
from ftedit.cache import file_digest
from ftedit.config import ConfigError, parse_assignments, recipe_names, resolve_config
from ftedit.errors import InputError
from ftedit.methods import AppliedEdit, apply_method, method_names

logger = logging.getLogger(__name__)

#: Bump when what a result file means changes, so older results are recomputed rather than reused.
RESULT_VERSION = 1
UNEDITED = "unedited"
METRICS = ("efficacy", "generalization", "locality", "edit_score")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# Overrides are comma-separated, but values may hold commas ("params.layers=15,16"): split only before "key=".
_OVERRIDE_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w.]*\s*=)")
_NO_AUGMENT = "augment.n_paraphrases=0,augment.n_random=0,augment.n_similar=0"

#: Built-in entry lists. Each entry pins what its row ablates; everything else comes from the recipe, and a
#: global ``--set`` (e.g. smaller augmentation counts) applies to every entry that does not pin that field.
ABLATIONS: dict[str, list[str]] = {
    # Paper 000, Table 2 (mass editing): objective and augmentation ablated on the same weights (the last three
    # layers' MLP up+down projections), optimizer, epochs and batch size (those of the ft/ft-mask-para-rand recipes).
    "paper000": [
        f"ft=ft:objective.conditional=false,{_NO_AUGMENT}",
        f"ft+mask=ft:objective.conditional=true,{_NO_AUGMENT}",
        "ft+mask+para=ft-mask-para-rand:augment.n_random=0,augment.n_similar=0",
        "ft+mask+para+rand=ft-mask-para-rand:augment.n_similar=0",
        "ft+mask+para+rand+dpo=ft-mask-para-rand:augment.n_similar=0,objective.dpo_weight=1.0",
    ],
    # Paper 001's ablation, starting from EasyEdit's FT-M (prompt-masked, one down projection at relative depth
    # 0.66, Adam lr 5e-4). Every row sees each edit 25 times (25 steps per edit depth-first, 25 epochs
    # breadth-first), so only the pipeline, then the batch size, then the location change.
    "paper001": [
        f"df-bs1=ft-m:train.pipeline=depth,train.batch_size=1,train.steps_per_edit=25,{_NO_AUGMENT}",
        f"bf-bs1=ft-m:train.pipeline=breadth,train.batch_size=1,train.epochs=25,train.loss_threshold=0,"
        f"train.fresh_optimizer_per_edit=false,{_NO_AUGMENT}",
        f"bf-mb=ft-m:train.pipeline=breadth,train.batch_size=32,train.epochs=25,train.loss_threshold=0,"
        f"train.fresh_optimizer_per_edit=false,{_NO_AUGMENT}",
        f"bf-mb-loc=locft-bf:params.layers=-3,params.modules=down,train.batch_size=32,train.epochs=25,{_NO_AUGMENT}",
    ],
}


class BenchError(InputError):
    """A bad entry, option or input, caught before anything expensive runs."""


@dataclass
class Entry:
    label: str
    method: str
    overrides: list[str] = field(default_factory=list)

    @property
    def spec(self) -> str:
        return f"{self.label}={self.method}" + (":" + ",".join(self.overrides) if self.overrides else "")


def parse_entry(text: str) -> Entry:
    """``"LABEL=METHOD[:key=value,...]"`` -> :class:`Entry`; the method must be one of ``method_names()``."""
    label, sep, rest = text.strip().partition("=")
    label = label.strip()
    if not sep or not rest.strip():
        raise BenchError(f"entry {text!r}: expected LABEL=METHOD[:key=value,...], e.g. 'mine=locft-bf:train.lr=1e-4'")
    if not _LABEL.match(label) or label == UNEDITED:
        raise BenchError(f"entry {text!r}: label {label!r} must be letters, digits, '.', '_', '+' or '-' "
                         f"(it names the result file) and not {UNEDITED!r}")
    method, _, raw = rest.partition(":")
    method = method.strip()
    if method not in method_names():
        raise BenchError(f"entry {text!r}: unknown method {method!r}; available: {', '.join(method_names())}")
    overrides = [o.strip() for o in _OVERRIDE_SPLIT.split(raw) if o.strip()] if raw.strip() else []
    try:
        parse_assignments(overrides)
    except ConfigError as e:
        raise BenchError(f"entry {text!r}: {e}") from e
    return Entry(label, method, overrides)


def ablation_entries(name: str) -> list[Entry]:
    if name not in ABLATIONS:
        raise BenchError(f"unknown ablation {name!r}; available: {', '.join(sorted(ABLATIONS))}")
    return [parse_entry(text) for text in ABLATIONS[name]]


def resolve_entries(entries: Sequence[str], ablations: Sequence[str]) -> list[Entry]:
    out = [e for name in ablations for e in ablation_entries(name)] + [parse_entry(t) for t in entries]
    if not out:
        raise BenchError("nothing to run: give entries LABEL=METHOD[:key=value,...] and/or --ablation NAME")
    seen: set[str] = set()
    for e in out:
        if e.label in seen:
            raise BenchError(f"entry label {e.label!r} appears twice; labels name result files and must be unique")
        seen.add(e.label)
    return out


@dataclass
class BenchSettings:
    """Everything shared by all entries of one bench run (also what each worker process receives)."""

    model: str
    data: str
    out: str
    n: int | None = None
    offset: int = 0
    pool: str | None = None
    overrides: list[str] = field(default_factory=list)  # global --set, applied under each entry's own overrides
    device: str | None = None
    dtype: str = "auto"
    protocol: str = "auto"
    batch_size: int = 32
    generation: dict[str, Any] | None = None  # GenerationOptions fields: also measure fluency
    seed: int = 0
    progress: bool = False


def entry_overrides(settings: BenchSettings, entry: Entry) -> list[str]:
    """Global --set first, then the entry's: later assignments win, so the entry's pins take precedence."""
    return list(settings.overrides) + list(entry.overrides)


def resolved_config(settings: BenchSettings, entry: Entry) -> dict[str, Any] | None:
    """The recipe config an entry will train with (None for baselines, which resolve their own)."""
    if entry.method not in recipe_names():
        return None
    try:
        return resolve_config(entry.method, None, parse_assignments(entry_overrides(settings, entry))).to_dict()
    except (ConfigError, ValueError) as e:
        raise BenchError(f"entry {entry.spec!r}: {e}") from e


def _needs_pool(config: dict[str, Any] | None, method: str) -> bool:
    if method == UNEDITED:
        return False
    if config is None:
        return True  # a baseline may read it; its identity then belongs in the key
    return bool(config["augment"]["n_random"] or config["augment"]["n_similar"])


def _file_digest(path: str | None) -> str | None:
    return file_digest(path) if path and Path(path).is_file() else None


def model_key(spec: str) -> dict[str, str]:
    """Identity of a model spec without loading it: the fingerprint ``load_model`` records (GGUF or weight-file hash)."""
    from ftedit.models import _resolve

    source, name_or_path, fingerprint = _resolve(spec)
    return {"spec": spec, "source": source, "name_or_path": name_or_path, "fingerprint": fingerprint}


def entry_key(settings: BenchSettings, entry: Entry, model: dict[str, str], config: dict[str, Any] | None,
              digests: dict[str, str | None]) -> dict[str, Any]:
    """Everything that determines an entry's numbers; its hash decides whether a stored result is reused."""
    return {
        "version": RESULT_VERSION, "model": model, "device": settings.device, "dtype": settings.dtype,
        "data": {"source": settings.data, "sha256": digests["data"], "n": settings.n, "offset": settings.offset},
        "method": entry.method, "overrides": entry_overrides(settings, entry) if entry.method != UNEDITED else [],
        "config": config,
        "pool": {"source": settings.pool, "sha256": digests["pool"]} if _needs_pool(config, entry.method) else None,
        "eval": {"protocol": settings.protocol, "batch_size": settings.batch_size, "generation": settings.generation},
        "seed": settings.seed,
    }


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Planned:
    entry: Entry
    config: dict[str, Any] | None
    key: dict[str, Any]
    hash: str
    path: Path


def plan(settings: BenchSettings, entries: Sequence[Entry], model: dict[str, str]) -> list[Planned]:
    """Validate every entry (config, pool) up front and compute where and under which hash its result lives."""
    digests = {"data": _file_digest(settings.data), "pool": _file_digest(settings.pool)}
    results = Path(settings.out) / "results"
    planned = []
    for entry in [Entry(UNEDITED, UNEDITED), *entries]:
        config = resolved_config(settings, entry) if entry.method != UNEDITED else None
        if config and _needs_pool(config, entry.method) and not (settings.pool or config["augment"]["pool"]):
            raise BenchError(f"entry {entry.spec!r} draws random/similar facts from a pool: pass --pool FILE "
                             "(e.g. the COUNTERFACT train split)")
        key = entry_key(settings, entry, model, config, digests)
        planned.append(Planned(entry, config, key, key_hash(key), results / f"{entry.label}.json"))
    return planned


def stored_result(p: Planned) -> dict[str, Any] | None:
    """The finished result for ``p`` if one is stored under the same hash; None (recompute) otherwise."""
    if not p.path.is_file():
        return None
    try:
        stored = json.loads(p.path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("%s: unreadable (%s); recomputing", p.path, e)
        return None
    if stored.get("hash") != p.hash:
        logger.info("%s: configuration changed since it was computed; recomputing", p.entry.label)
        return None
    return stored


# ---- running one entry (in a worker process, or in-process with --no-isolate) ----

def _rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _cuda_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / (1 << 20) if device.type == "cuda" else None


def _reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _train_summary(applied: AppliedEdit) -> dict[str, Any]:
    runs = applied.train
    return {"steps": sum(r.steps for r in runs), "final_loss": runs[-1].final_loss if runs else None,
            "seconds": applied.phase_seconds}


def run_entry(p: Planned, settings: BenchSettings, model, tok, identity, requests, pool) -> dict[str, Any]:
    """Apply one entry to ``model``, evaluate it, undo it; return its result record."""
    from ftedit.evaluate import GenerationOptions, evaluate_requests

    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    _reset_cuda_peak(device)
    record: dict[str, Any] = {"label": p.entry.label, "method": p.entry.method, "overrides": p.key["overrides"],
                              "hash": p.hash, "key": p.key, "model": identity.to_dict(), "n_requests": len(requests)}
    memory = {"rss_after_load_mb": _rss_mb()}
    applied = None
    start = time.perf_counter()
    if p.entry.method != UNEDITED:
        applied = apply_method(p.entry.method, model, tok, requests, overrides=p.key["overrides"], pool=pool,
                               progress=settings.progress, model_fingerprint=identity.fingerprint,
                               identity=identity, pool_source=settings.pool)
        info = {"trainable_parameters": applied.trainable_parameters,
                "examples_by_kind": applied.examples_by_kind}
        record.update(config=applied.config, touched=applied.touched_dicts(), info=info,
                      train=_train_summary(applied))
    edit_seconds = time.perf_counter() - start
    memory.update(rss_after_edit_mb=_rss_mb(), cuda_edit_peak_mb=_cuda_peak_mb(device))
    _reset_cuda_peak(device)
    generation = GenerationOptions(**settings.generation) if settings.generation else None
    try:
        result = evaluate_requests(applied.model if applied else model, tok, requests, protocol=settings.protocol,
                                   batch_size=settings.batch_size, progress=settings.progress,
                                   generation=generation)
    finally:
        if applied is not None:
            applied.restore()
    memory.update(rss_peak_mb=_rss_mb(), cuda_eval_peak_mb=_cuda_peak_mb(device))
    record.update(metrics=result.summary, seconds={"edit": edit_seconds, "eval": result.summary["seconds"]},
                  memory=memory, finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return record


def _load_inputs(settings: BenchSettings):
    from ftedit.data.loaders import load_pool_facts, load_requests
    from ftedit.models import load_model

    loaded = load_requests(settings.data, n=settings.n, offset=settings.offset)
    pool = load_pool_facts(settings.pool) if settings.pool else None
    model, tok, identity = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    return model, tok, identity, loaded.requests, pool


def worker_main(spec_path: str) -> None:
    """Entry point of an isolated worker: run the one entry described in ``spec_path`` and store its result."""
    spec = json.loads(Path(spec_path).read_text())
    settings = BenchSettings(**spec["settings"])
    p = Planned(Entry(**spec["entry"]), spec["config"], spec["key"], spec["hash"], Path(spec["path"]))
    record = run_entry(p, settings, *_load_inputs(settings))
    record["memory"]["measured"] = "fresh process per entry: ru_maxrss of that process"
    write_json_atomic(p.path, record)


def _worker_env() -> dict[str, str]:
    """The worker imports this very ftedit (a worktree or checkout may differ from the installed one)."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_isolated(p: Planned, settings: BenchSettings) -> dict[str, Any]:
    spec_path = Path(settings.out) / "work" / f"{p.entry.label}.spec.json"
    write_json_atomic(spec_path, {"settings": asdict(settings), "entry": asdict(p.entry), "config": p.config,
                                  "key": p.key, "hash": p.hash, "path": str(p.path)})
    proc = subprocess.run([sys.executable, "-m", "ftedit.bench", str(spec_path)], env=_worker_env(), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {p.entry.label!r} exited with status {proc.returncode} (its log is above)")
    stored = stored_result(p)
    if stored is None:
        raise RuntimeError(f"worker for {p.entry.label!r} finished but left no matching {p.path}")
    return stored


def _weights_digest(model) -> list[float]:
    with torch.no_grad():
        return [p.detach().double().abs().sum().item() for p in model.parameters()]


class InProcess:
    """All entries on one loaded model; checks after each that the model really is back to its original weights."""

    def __init__(self, settings: BenchSettings):
        self.settings = settings
        self.model, self.tok, self.identity, self.requests, self.pool = _load_inputs(settings)
        self.digest = _weights_digest(self.model)

    def __call__(self, p: Planned) -> dict[str, Any]:
        record = run_entry(p, self.settings, self.model, self.tok, self.identity, self.requests, self.pool)
        if _weights_digest(self.model) != self.digest:
            raise RuntimeError(f"{p.entry.label}: restore() did not give back the original weights; "
                               "later entries would start from an edited model")
        record["memory"]["measured"] = "one process for all entries: ru_maxrss is the peak so far, not per method"
        write_json_atomic(p.path, record)
        return record


# ---- the run and its outputs ----

def run_bench(settings: BenchSettings, entries: Sequence[Entry], isolate: bool = True) -> dict[str, Any]:
    """Run (or reuse) every entry plus the unedited reference; write the tables, JSON and plot after each one.

    Returns the results.json payload. A failed entry is reported in the table and not stored, so a rerun
    retries it; the others still run.
    """
    from ftedit.data.loaders import load_requests

    loaded = load_requests(settings.data, n=settings.n, offset=settings.offset)  # fail on bad data before work
    model = model_key(settings.model)
    planned = plan(settings, entries, model)
    runner = None if isolate else InProcess(settings)
    rows: list[dict[str, Any]] = []
    for i, p in enumerate(planned, 1):
        stored = stored_result(p)
        if stored is not None:
            logger.info("[%d/%d] %s: reusing %s", i, len(planned), p.entry.label, p.path)
            rows.append({**stored, "status": "reused"})
        else:
            logger.info("[%d/%d] %s: %s %s", i, len(planned), p.entry.label, p.entry.method,
                        " ".join(p.key["overrides"]))
            rows.append(_run_one(p, settings, runner))
        payload = _payload(settings, model, len(loaded.requests), isolate, rows)
        write_outputs(Path(settings.out), payload)
    return payload


def _run_one(p: Planned, settings: BenchSettings, runner) -> dict[str, Any]:
    try:
        record = runner(p) if runner is not None else run_isolated(p, settings)
    except Exception as e:  # one method failing must not cost the others' results
        logger.error("%s failed: %s", p.entry.label, e)
        return {"label": p.entry.label, "method": p.entry.method, "overrides": p.key["overrides"], "hash": p.hash,
                "key": p.key, "status": "failed", "error": str(e)}
    summary = record["metrics"]
    logger.info("%s: ES %.1f PS %.1f NS %.1f score %.1f (edit %.0fs, eval %.0fs)", p.entry.label,
                *(summary.get(m, float("nan")) for m in METRICS), record["seconds"]["edit"],
                record["seconds"]["eval"])
    return {**record, "status": "computed"}


def _payload(settings: BenchSettings, model: dict[str, str], n_requests: int, isolate: bool,
             rows: list[dict[str, Any]]) -> dict[str, Any]:
    identity = next((r["model"] for r in rows if "model" in r), None)
    return {"config": {**asdict(settings), "isolate": isolate, "n_requests": n_requests},
            "model": {**model, "identity": identity}, "rows": rows}


def describe_config(row: dict[str, Any]) -> str:
    """The fields that distinguish fine-tuning entries, in one line (baselines: their overrides)."""
    cfg = row.get("key", {}).get("config")
    if row["method"] == UNEDITED:
        return "no edit"
    if not cfg:
        return " ".join(row.get("overrides", [])) or "defaults"
    t, prm, a, o = cfg["train"], cfg["params"], cfg["augment"], cfg["objective"]
    budget = (f"depth {t['steps_per_edit']} steps/edit" if t["pipeline"] == "depth" else
              f"breadth {t['epochs']} epochs")
    bank = a["paraphrase_bank"] and a["n_paraphrases"]
    aug = f"para {a['n_paraphrases']}" + (f" (bank {a['paraphrase_bank']})" if bank else "")
    aug += f", rand {a['n_random']}, sim {a['n_similar']}"
    layers = sorted({t["layer"] for t in row.get("touched", [])})
    where = f"layers {prm['layers']}" + (f" = {','.join(map(str, layers))}" if layers else "")
    parts = [cfg["mode"], f"{where} {prm['modules']} ({prm['method']})", budget,
             f"bs {t['batch_size']}", f"{t['optimizer']} lr {t['lr']:g}",
             "masked" if o["conditional"] else "full likelihood", aug]
    if o["dpo_weight"]:
        parts.append(f"dpo {o['dpo_weight']:g} (beta {o['dpo_beta']:g})")
    if t["loss_threshold"]:
        parts.append(f"stop at loss {t['loss_threshold']:g}")
    return "; ".join(parts)


COLUMNS = ("label", "method", "status", *METRICS, "edit_s", "eval_s", "peak_rss_mb", "cuda_peak_mb",
           "train_examples", "trainable_params", "steps", "config")


def table_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for row in payload["rows"]:
        metrics, seconds, memory = row.get("metrics", {}), row.get("seconds", {}), row.get("memory", {})
        info = row.get("info", {})
        cuda = [v for v in (memory.get("cuda_edit_peak_mb"), memory.get("cuda_eval_peak_mb")) if v is not None]
        out.append({
            "label": row["label"], "method": row["method"], "status": row["status"],
            **{m: metrics.get(m) for m in METRICS},
            "edit_s": seconds.get("edit"), "eval_s": seconds.get("eval"),
            "peak_rss_mb": memory.get("rss_peak_mb") if "fresh process" in memory.get("measured", "") else None,
            "cuda_peak_mb": max(cuda) if cuda else None,
            "train_examples": sum(info.get("examples_by_kind", {}).values()) or None,
            "trainable_params": info.get("trainable_parameters"),
            "steps": row.get("train", {}).get("steps"),
            "config": describe_config(row) if row["status"] != "failed" else row.get("error", ""),
        })
    return out


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def render_markdown(payload: dict[str, Any]) -> str:
    cfg, rows = payload["config"], table_rows(payload)
    identity = payload["model"].get("identity") or {}
    lines = [f"# ftedit bench: {cfg['model']} ({identity.get('model_class', '?')}, {identity.get('dtype', '?')})",
             "",
             f"{cfg['n_requests']} edits from `{cfg['data']}` (offset {cfg['offset']}); pool `{cfg['pool']}`; "
             f"global overrides: `{' '.join(cfg['overrides']) or 'none'}`. ES/PS/NS = efficacy/generalization/"
             "locality, score = their harmonic mean (x100). Times in seconds; peak RSS of the entry's own process "
             "(model load + edit + evaluation).",
             "",
             "| " + " | ".join(COLUMNS[:-1]) + " |",
             "|" + "|".join("---" if c in ("label", "method", "status") else "---:" for c in COLUMNS[:-1]) + "|"]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS[:-1]) + " |" for r in rows]
    lines += ["", "## Entry configurations", ""]
    shared = list(cfg["overrides"])
    for row, r in zip(payload["rows"], rows, strict=True):
        own = row.get("overrides", [])
        overrides = " ".join(own[len(shared):] if own[:len(shared)] == shared else own)  # global ones are above
        lines.append(f"- **{r['label']}**: `{r['method']}`" + (f" `{overrides}`" if overrides else "")
                     + f" -> {r['config']}")
    return "\n".join(lines) + "\n"


def render_csv(payload: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(table_rows(payload))
    return buf.getvalue()


def render_plot(payload: dict[str, Any]) -> bytes:
    """Grouped bars: ES, PS, NS and score for every entry that has metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in table_rows(payload) if r["efficacy"] is not None]
    x = np.arange(len(rows))
    width = 0.2
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5))
    for k, (metric, name) in enumerate(zip(METRICS, ("ES", "PS", "NS", "score"), strict=True)):
        ax.bar(x + (k - 1.5) * width, [r[metric] or 0.0 for r in rows], width, label=name)
    ax.set_xticks(x, [r["label"] for r in rows], rotation=25, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("percent")
    ax.set_title(f"{payload['config']['model']}: {payload['config']['n_requests']} edits")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(out: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(out / "results.json", payload)
    write_bytes_atomic(out / "table.md", render_markdown(payload).encode())
    write_bytes_atomic(out / "table.csv", render_csv(payload).encode())
    write_bytes_atomic(out / "plot.png", render_plot(payload))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m ftedit.bench WORKER_SPEC.json (started by `ftedit bench`)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    worker_main(sys.argv[1])
