"""Writing a study: result.json (atomic), one retention-vs-step PNG per task, and report.md for people."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftedit.atomic import write_bytes_atomic, write_json_atomic

logger = logging.getLogger(__name__)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _label(run: dict[str, Any]) -> str:
    return f"{run.get('method', '?')} / {run['strategy']}"


def plot_task(runs: Sequence[dict[str, Any]], task: str, path: Path) -> Path:
    """Edited (solid) and intrinsic (dashed) retention against downstream step, one colour per method/strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for i, run in enumerate(r for r in runs if r["task"] == task):
        steps = [c["step"] for c in run["curve"]]
        colour = f"C{i % 10}"
        ax.plot(steps, [c["edited"] for c in run["curve"]], "-o", color=colour, label=f"{_label(run)}: edited")
        ax.plot(steps, [c["intrinsic"] for c in run["curve"]], "--s", color=colour,
                label=f"{_label(run)}: intrinsic")
    ax.set_xlabel("downstream fine-tuning step (0 = right after editing)")
    ax.set_ylabel("known (% of probes)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"Edited vs intrinsic knowledge during '{task}' fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def _val(run: dict[str, Any], index: int) -> str:
    validation = run["log"].get("validation") or []
    return _fmt(validation[index][1], 3) if validation else "n/a"


def _stopped(run: dict[str, Any]) -> str:
    stopped = run["log"]["stopped_by"]
    return ", ".join(f"{k} x{v}" for k, v in stopped.items()) if isinstance(stopped, dict) else stopped


def _ci(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("rate") is None:
        return "n/a"
    return f"{stat['rate']:.1f} [{stat['low']:.1f}, {stat['high']:.1f}] (n={stat['n']})"


def _gap(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("gap") is None:
        return "n/a"
    return f"{stat['gap']:+.1f} [{stat['low']:+.1f}, {stat['high']:+.1f}]"


def _drift(run: dict[str, Any], field_name: str) -> str:
    drift = run.get("drift", {})
    return " / ".join(_fmt(drift.get(k, {}).get(field_name)) for k in ("edited", "intrinsic"))


def _steps(run: dict[str, Any]) -> str:
    steps = run["log"]["steps"]
    return _fmt(steps, 1 if isinstance(steps, float) else 0)


def _summary_table(result: dict[str, Any]) -> list[str]:
    lines = ["| method | task | strategy | stopped by | steps | known % edited / intrinsic: post-edit -> end | "
             "edited retained % [95% CI] | paraphrase retained % | intrinsic retained % | edited - intrinsic "
             "(points) | lost edits: original / related / other | top-1 changed % (edited / intrinsic) | "
             "target left top-3 % (edited / intrinsic) |", "|---|---|---|---|---:|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        fb = run["fallback"]
        retention = run.get("retention", {})
        first, last = run["curve"][0], run["curve"][-1]
        lines.append(
            f"| {run.get('method', '?')} | {run['task']} | {run['strategy']} | {_stopped(run)} | {_steps(run)} | "
            f"{_fmt(first['edited'])} / {_fmt(first['intrinsic'])} -> {_fmt(last['edited'])} / "
            f"{_fmt(last['intrinsic'])} | "
            f"{_ci(retention.get('edited'))} | {_ci(retention.get('paraphrase'))} | "
            f"{_ci(retention.get('intrinsic'))} | {_gap(run.get('gap_edited_minus_intrinsic'))} | "
            f"{fb.get('original', 0)} / {fb.get('related', 0)} / {fb.get('other', 0)} | "
            f"{_drift(run, 'top1_changed')} | {_drift(run, 'target_left_top3')} |")
    return lines


def _cost_table(result: dict[str, Any]) -> list[str]:
    """What each strategy costs the downstream task: trainable share, final metric, steps to the threshold."""
    lines = ["| method | task | strategy | frozen params | rehearsal share | anchor lambda | val metric start -> "
             "end | steps | steps vs none | stopped by |", "|---|---|---|---:|---:|---:|---|---:|---:|---|"]
    none = {(r.get("method"), r["task"]): r["log"]["steps"] for r in result["runs"] if r["strategy"] == "none"}
    for run in result["runs"]:
        prot = run.get("protection") or {}
        reference = none.get((run.get("method"), run["task"]))
        delta = "n/a" if reference is None else f"{run['log']['steps'] - reference:+g}"
        lines.append(f"| {run.get('method', '?')} | {run['task']} | {run['strategy']} | {run['frozen_parameters']:,} | "
                     f"{(prot.get('rehearsal') or {}).get('share', '-')} | {(prot.get('anchor') or {}).get('lambda', '-')} | "
                     f"{_val(run, 0)} -> {_val(run, -1)} | {_steps(run)} | {delta} | {_stopped(run)} |")
    return lines


def _curves(result: dict[str, Any], task: str) -> list[str]:
    runs = [r for r in result["runs"] if r["task"] == task]
    longest = max(runs, key=lambda r: len(r["curve"]))
    lines = ["| method / strategy | " + " | ".join(f"{c['label']}" for c in longest["curve"]) + " |",
             "|---|" + "---|" * len(longest["curve"])]
    for run in runs:
        cells = [f"{_fmt(c['edited'])} / {_fmt(c['intrinsic'])}" for c in run["curve"]]
        lines.append(f"| {_label(run)} | " + " | ".join(cells) + " |")
    if any(len(r["curve"]) != len(longest["curve"]) for r in runs):
        lines.append("\n(runs stopped at different steps: each row's cells are that run's own checkpoints)")
    return lines


def _cap_lines(result: dict[str, Any]) -> list[str]:
    capped = result.get("cap_stopped") or []
    if not capped:
        return ["Every run stopped by its task's threshold.", ""]
    lines = ["**Runs the step cap stopped before their threshold** (their retention is not comparable):", ""]
    lines += [f"- {c['method']} / {c['task']} / {c['strategy']}: {c['runs']} run(s), {c['steps']} steps, final "
              f"metric {_fmt(c['final_metric'], 3)}" for c in capped]
    return lines + [""]


def _top3(snapshot: dict[str, Any], i: int) -> str:
    return " — ".join(f"{tok!s} ({p:.3f})" for tok, p in snapshot["top3"][i])


def _table1(result: dict[str, Any], max_examples: int) -> list[str]:
    """The paper's Table 1: top-3 next tokens across stages for a few edited probes (mass protocol runs)."""
    lines: list[str] = []
    probes = result["probes"]
    for run in result["runs"]:
        if "snapshots" not in run:
            continue
        lost = [x["index"] for x in run["lost_edits"]]
        kept = [i for i, p in enumerate(probes) if p["kind"] == "edited" and i not in lost]
        for i in (lost + kept)[:max_examples]:
            p = probes[i]
            lines += [f"**{_label(run)} / {run['task']}** — \"{p['prompt']}\" (true: {p['original']}, "
                      f"edit: {p['target']})", "", "| stage | top-3 next tokens (probability) |", "|---|---|",
                      f"| base | {_top3(result['base'], i)} |"]
            lines += [f"| {s['label']} | {_top3(s, i)} |" for s in run["snapshots"]]
            lines.append("")
    return lines


def _base_intrinsic(result: dict[str, Any]) -> float | None:
    flags = [k for k, p in zip(result["base"]["known"], result["probes"]) if p["kind"] == "intrinsic"]
    return 100.0 * sum(flags) / len(flags) if flags else None


def _edit_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for edit in result.get("edits", []):
        location = edit.get("location") or {}
        where = (f"layer {location['layer']} {location.get('module', '')} ({location.get('source')})"
                 if location.get("layer") is not None else location.get("source", "as configured"))
        lines.append(f"- method **{edit['method']}**" + (f" (from `{edit['from_edit']}`)" if edit.get("from_edit")
                                                         else "") + f": location {where}; touched "
                     + ", ".join(sorted({m['name'] for m in edit.get('touched', [])})))
    return lines


def render_markdown(result: dict[str, Any], plots: dict[str, str], max_examples: int = 2) -> str:
    cfg = result["config"]
    lines = ["# Retention of edited knowledge under downstream fine-tuning", "",
             *([] if result.get("complete", True) else
               ["**Interim report: the study is still running (or was interrupted); runs below are complete.**",
                ""]),
             f"- protocol: **{result['protocol']}**, {result['n_edits']} edits, {result['n_intrinsic']} intrinsic facts",
             *_edit_lines(result),
             f"- intrinsic selection: {result['intrinsic_selection']}; known by the base model: "
             f"{_fmt(_base_intrinsic(result))}%",
             f"- downstream hyperparameters (same for every run): {cfg['downstream']}",
             f"- wall time: {result['wall_seconds']:.0f} s", ""]
    if result.get("command"):
        lines += ["```", result["command"], "```", ""]
    lines += ["## Downstream tasks", "", "| task | source | metric | threshold | train | val | removed by the edit "
              "filter |", "|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {t['kind']} | {t['source']} | {t['metric']} ({t['direction']}) | {t['threshold']} | {t['n_train']} | "
              f"{t['n_val']} | {t['removed_by_filter']} |" for t in result["tasks"]]
    lines += ["", *_cap_lines(result), "## Retention", "", *_summary_table(result), "",
              "Retained = % of the probes known right after editing that are still known at the end of the run "
              "(95% percentile bootstrap over facts; a probe is known when its first non-stop-word greedy token is "
              "the object's first token). A lost edit's fallback is `original` (the true object's first token), "
              "`related` (another object of the same relation in the edits or the intrinsic pool) or `other`. "
              "Drift compares each probe's top-3 next tokens after editing with those at the end.", "",
              "## Cost of each strategy on the downstream task", "", *_cost_table(result), ""]
    for task in dict.fromkeys(r["task"] for r in result["runs"]):
        lines += [f"### {task}: edited / intrinsic known (%) at each checkpoint", "", *_curves(result, task), ""]
        if task in plots:
            lines += [f"![{task}]({plots[task]})", ""]
    table1 = _table1(result, max_examples)
    if table1:
        lines += ["## Top-3 next tokens across training (paper 002, Table 1)", "", *table1]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, result: dict[str, Any], max_examples: int = 2) -> dict[str, Path]:
    """Write result.json, retention_<task>.png and report.md under ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for task in dict.fromkeys(r["task"] for r in result["runs"]):
        name = f"retention_{task}.png"
        paths[name] = plot_task(result["runs"], task, out / name)
        plots[task] = name
    result = {**result, "plots": plots}
    paths["result.json"] = write_json_atomic(out / "result.json", result)
    paths["report.md"] = write_bytes_atomic(out / "report.md", render_markdown(result, plots, max_examples).encode())
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
