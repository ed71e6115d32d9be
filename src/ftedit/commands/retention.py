"""``ftedit retention``: how much edited vs intrinsic knowledge survives downstream fine-tuning (paper 002)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ftedit.commands import options
from ftedit.commands.console import console


def retention_command(
    out: Annotated[Path, typer.Option(help="Output folder: report.md, result.json, retention_<task>.png.")],
    task: Annotated[list[str], typer.Option(help="Downstream task KIND=SOURCE (lm, facts, classification, sft); "
                                                 "SOURCE: .jsonl/.json/.csv/.txt file or hf:NAME. Repeatable.")],
    intrinsic_pool: Annotated[str, typer.Option(help="Facts for the intrinsic set (e.g. COUNTERFACT train).")],
    edits: Annotated[str | None, typer.Option(help="Edit requests (COUNTERFACT/ZsRE JSON, JSONL/CSV).")] = None,
    from_edit: Annotated[str | None, typer.Option(help="Start from an `ftedit edit` output folder instead.")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: demo, or the manifest's).")] = None,
    method: Annotated[list[str] | None, typer.Option(
        help="Edit method: a recipe or a registered baseline (default: the default recipe, at its located "
             "layer). Repeatable: each method edits the base model in turn.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one method field; METHOD:FIELD=VALUE "
                                                                 "for one method only.")] = None,
    pool: Annotated[str | None, typer.Option(help="Fact pool for recipes with random/similar augmentation.")] = None,
    n: Annotated[int | None, typer.Option(help="Number of edits.")] = 50,
    offset: Annotated[int, typer.Option(help="First edit record.")] = 0,
    strategy: Annotated[list[str] | None, typer.Option(
        help="Protection strategy: none | edits | below:K | below:edit | window:LAYERS | around:R | "
             "rehearsal[:SHARE] | anchor[:LAMBDA], or several joined by '+'. Repeatable.")] = None,
    protocol: Annotated[str, typer.Option(help="mass (all edits, one run) or single (each edit alone).")] = "mass",
    threshold: Annotated[list[str] | None, typer.Option(help="Stopping threshold of each task (required): "
        "KIND=VALUE (loss: below, accuracy: above) or KIND=rel:F (F x the base model's validation metric).")] = None,
    max_steps: Annotated[int, typer.Option(help="Safety cap of every downstream run; the report lists any run "
                                                "it stopped before its threshold.")] = 1000,
    eval_every: Annotated[int, typer.Option(help="Validate every N steps.")] = 5,
    probe_every: Annotated[int, typer.Option(help="Measure retention every N steps.")] = 10,
    lr: Annotated[float, typer.Option(help="Downstream learning rate (AdamW).")] = 2e-5,
    batch_size: Annotated[int, typer.Option(help="Downstream batch size.")] = 8,
    n_train: Annotated[int, typer.Option(help="Training records per task (after filtering).")] = 2000,
    n_val: Annotated[int, typer.Option(help="Validation records per task.")] = 64,
    max_length: Annotated[int, typer.Option(help="Tokens per downstream sequence.")] = 64,
    n_intrinsic: Annotated[int, typer.Option(help="Intrinsic facts to track.")] = 50,
    filter_intrinsic: Annotated[bool, typer.Option(help="Also filter texts naming intrinsic facts.")] = False,
    sft_chat_template: Annotated[str, typer.Option(help="sft task: auto (the tokenizer's chat template when it "
                                                        "has one), on, off.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing study in --out.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted study in --out (same command): its "
                                              "finished runs are kept.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    dtype: options.Dtype = "auto",
    progress: options.Progress = True,
) -> None:
    """Edit, fine-tune downstream under protection strategies until each task's threshold, and report how much
    edited vs intrinsic knowledge survives (paper 002)."""
    from ftedit.config import DEFAULT_RECIPE
    from ftedit.errors import on_interrupt
    from ftedit.retention.finetune import downstream_config
    from ftedit.retention.run import interrupted_study, run_retention
    from ftedit.retention.study import StudyConfig
    from ftedit.retention.tasks import parse_tasks

    tasks = parse_tasks(task, threshold or [], {"n_train": n_train, "n_val": n_val, "max_length": max_length,
                                                "chat_template": sft_chat_template})
    cfg = StudyConfig(tasks=tasks, intrinsic_pool=intrinsic_pool, edits=edits, n_edits=n, offset=offset,
                      methods=method or [DEFAULT_RECIPE], overrides=set_ or [], method_pool=pool, from_edit=from_edit,
                      strategies=strategy or ["none", "edits"], protocol=protocol, n_intrinsic=n_intrinsic,
                      filter_intrinsic=filter_intrinsic,
                      downstream=downstream_config(lr=lr, batch_size=batch_size, max_steps=max_steps,
                                                   eval_every=eval_every, probe_every=probe_every))
    with on_interrupt(lambda: interrupted_study(out, sys.argv[1:])):
        result = run_retention(cfg, model=model, out=out, overwrite=overwrite, device=device, dtype=dtype,
                               progress=progress, resume=resume)
    print_summary(result)
    console.print(f"wrote {out}/report.md, result.json and the plots")


def _retained(run: dict[str, Any], kind: str) -> str:
    r = run.get("retention", {}).get(kind)
    return "n/a" if not r or r["rate"] is None else f"{r['rate']:.1f} [{r['low']:.0f}, {r['high']:.0f}]"


def print_summary(result: dict[str, Any]) -> None:
    table = Table(title=f"retention (%) — {result['protocol']} protocol, {result['n_edits']} edits, "
                        f"{result['n_intrinsic']} intrinsic facts")
    for col in ("method", "task", "strategy", "stopped by", "steps", "final metric", "edited retained",
                "paraphrase retained", "intrinsic retained"):
        table.add_column(col)
    for run in result["runs"]:
        metric = run.get("final_metric")
        table.add_row(run["method"], run["task"], run["strategy"], str(run["log"]["stopped_by"]),
                      str(run["log"]["steps"]), "n/a" if metric is None else f"{metric:.3f}",
                      *(_retained(run, k) for k in ("edited", "paraphrase", "intrinsic")))
    console.print(table)
    for capped in result.get("cap_stopped", []):
        console.print(f"[yellow]the step cap stopped {capped['method']} / {capped['task']} / {capped['strategy']} "
                      f"before its threshold ({capped['runs']} run(s))[/yellow]")
