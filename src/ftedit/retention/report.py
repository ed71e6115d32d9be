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


def plot_task(runs: Sequence[dict[str, Any]], task: str, path: Path) -> Path:
    """Edited (solid) and intrinsic (dashed) retention against downstream step, one colour per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, run in enumerate(r for r in runs if r["task"] == task):
        steps = [c["step"] for c in run["curve"]]
        colour = f"C{i}"
        ax.plot(steps, [c["edited"] for c in run["curve"]], "-o", color=colour, label=f"{run['strategy']}: edited")
        ax.plot(steps, [c["intrinsic"] for c in run["curve"]], "--s", color=colour,
                label=f"{run['strategy']}: intrinsic")
    ax.set_xlabel("downstream fine-tuning step (0 = right after editing)")
    ax.set_ylabel("retention rate (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"Knowledge retention during '{task}' fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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


def _summary_table(result: dict[str, Any]) -> list[str]:
    base = result["base"]
    probes = result["probes"]
    intrinsic_base = 100.0 * sum(k for k, p in zip(base["known"], probes) if p["kind"] == "intrinsic") / max(
        1, sum(p["kind"] == "intrinsic" for p in probes))
    lines = ["| task | strategy | frozen params | stopped by | steps | val metric start -> end | edited: post-edit -> "
             "end | intrinsic: base -> post-edit -> end | lost edits: original / related / other |",
             "|---|---|---:|---|---:|---|---|---|---|"]
    for run in result["runs"]:
        first, last = run["curve"][0], run["curve"][-1]
        fb = run["fallback"]
        lines.append(
            f"| {run['task']} | {run['strategy']} | {run['frozen_parameters']:,} | {_stopped(run)} | "
            f"{_fmt(run['log']['steps'], 1 if isinstance(run['log']['steps'], float) else 0)} | "
            f"{_val(run, 0)} -> {_val(run, -1)} | {_fmt(first['edited'])} -> {_fmt(last['edited'])} | "
            f"{_fmt(intrinsic_base)} -> {_fmt(first['intrinsic'])} -> {_fmt(last['intrinsic'])} | "
            f"{fb.get('original', 0)} / {fb.get('related', 0)} / {fb.get('other', 0)} |")
    return lines


def _curves(result: dict[str, Any], task: str) -> list[str]:
    runs = [r for r in result["runs"] if r["task"] == task]
    lines = ["| strategy | " + " | ".join(f"{c['label']}" for c in runs[0]["curve"]) + " |",
             "|---|" + "---|" * len(runs[0]["curve"])]
    for run in runs:
        cells = [f"{_fmt(c['edited'])} / {_fmt(c['intrinsic'])}" for c in run["curve"]]
        lines.append(f"| {run['strategy']} | " + " | ".join(cells) + " |")
    if any(len(r["curve"]) != len(runs[0]["curve"]) for r in runs):
        lines.append("\n(runs stopped at different steps: each row's cells are that run's own checkpoints)")
    return lines


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
            lines += [f"**{run['task']} / {run['strategy']}** — \"{p['prompt']}\" (true: {p['original']}, "
                      f"edit: {p['target']})", "", "| stage | top-3 next tokens (probability) |", "|---|---|",
                      f"| base | {_top3(result['base'], i)} |"]
            lines += [f"| {s['label']} | {_top3(s, i)} |" for s in run["snapshots"]]
            lines.append("")
    return lines


def render_markdown(result: dict[str, Any], plots: dict[str, str], max_examples: int = 2) -> str:
    cfg = result["config"]
    edit = result["edit"]
    lines = ["# Retention of edited knowledge under downstream fine-tuning", "",
             *([] if result.get("complete", True) else
               ["**Interim report: the study is still running (or was interrupted); runs below are complete.**",
                ""]),
             f"- protocol: **{result['protocol']}**, method **{edit['method']}**"
             + (f" (from `{edit['from_edit']}`)" if edit.get("from_edit") else "")
             + f", {result['n_edits']} edits, {result['n_intrinsic']} intrinsic facts",
             "- touched by the edit: " + ", ".join(sorted({m['name'] for m in edit.get('touched', [])})),
             f"- intrinsic selection: {result['intrinsic_selection']}",
             f"- downstream hyperparameters (same for every run): {cfg['downstream']}",
             f"- wall time: {result['wall_seconds']:.0f} s", ""]
    if result.get("command"):
        lines += ["```", result["command"], "```", ""]
    lines += ["## Downstream tasks", "", "| task | source | metric | threshold | train | val | removed by the edit "
              "filter |", "|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {t['kind']} | {t['source']} | {t['metric']} ({t['direction']}) | {t['threshold']} | {t['n_train']} | "
              f"{t['n_val']} | {t['removed_by_filter']} |" for t in result["tasks"]]
    lines += ["", "## Retention (%)", "", *_summary_table(result), "",
              "Retention = % of probes whose first non-stop-word greedy token is the object's first token. "
              "A lost edit was known right after editing and is not at the end; its fallback is `original` "
              "(the true object's first token), `related` (another object of the same relation in the edits or "
              "the intrinsic pool) or `other`.", ""]
    for task in dict.fromkeys(r["task"] for r in result["runs"]):
        lines += [f"### {task}: edited / intrinsic retention at each checkpoint", "", *_curves(result, task), ""]
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
