"""``ftedit demo``: edit a few real COUNTERFACT facts in the bundled gemma-3-270m and show before and after.

The demo takes the default path of ``ftedit edit``: the default recipe, its location from the shipped
calibration result (no search), locality facts from the shipped pool.
"""

from __future__ import annotations

import math
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ftedit.calibration import resource
from ftedit.commands.console import console as default_console
from ftedit.config import DEFAULT_RECIPE
from ftedit.data.loaders import load_pool_facts, load_requests
from ftedit.data.requests import EditRequest
from ftedit.evaluate import evaluate_requests, next_token_topk, score_pairs
from ftedit.evaluate.answers import generate_answers, starts_with_target
from ftedit.methods import apply_spec
from ftedit.models import load_model
from ftedit.registry import ApplyContext, get_method

DEMO_RECIPE = DEFAULT_RECIPE
GENERATED_TOKENS = 8


def probe_rows(request: EditRequest) -> list[tuple[str, str]]:
    """The prompts shown for one edit: the edit itself, a paraphrase and an unrelated neighbor."""
    rows = [("edit", request.prompt)]
    if request.paraphrase_prompts:
        rows.append(("paraphrase", request.paraphrase_prompts[0]))
    if request.neighborhood:
        rows.append(("unrelated", request.neighborhood[0].prompt))
    return rows


def snapshot(model, tok, requests: list[EditRequest]) -> dict[tuple[int, str], tuple[str, float, float]]:
    """For each shown prompt: greedy continuation, P(new target), P(true target) (whole-target probabilities)."""
    keys, prompts, pairs = [], [], []
    for i, r in enumerate(requests):
        for kind, prompt in probe_rows(r):
            keys.append((i, kind))
            prompts.append(prompt)
            pairs += [(prompt, r.target_new), (prompt, r.target_true)]
    said = generate_answers(model, tok, prompts, GENERATED_TOKENS)
    scores = score_pairs(model, tok, pairs)
    return {key: (said[j], _prob(scores[2 * j]), _prob(scores[2 * j + 1])) for j, key in enumerate(keys)}


def _prob(score) -> float:
    return math.exp(sum(score.logprobs))


def show_top_predictions(console: Console, model, tok, requests: list[EditRequest]) -> None:
    table = Table(title="What the unedited model predicts next")
    table.add_column("prompt")
    table.add_column("top-3 next tokens")
    for r, top in zip(requests, next_token_topk(model, tok, [r.prompt for r in requests], k=3), strict=True):
        table.add_row(r.prompt, ", ".join(f"{t.token.strip()!r} {t.prob:.2f}" for t in top))
    console.print(table)


def show_before_after(console: Console, requests, before, after) -> None:
    table = Table(title=f"Before -> after the edit (greedy {GENERATED_TOKENS} tokens; P = probability of the whole "
                        "answer)", show_lines=False)
    for col in ("prompt", "the model says: before -> after", "P(new answer)", "P(true answer)"):
        table.add_column(col)
    for i, r in enumerate(requests):
        table.add_row(f"[bold]{r.subject}: {r.target_true} -> {r.target_new}[/bold]", "", "", "")
        for kind, prompt in probe_rows(r):
            b, a = before[(i, kind)], after[(i, kind)]
            style = "cyan" if kind == "unrelated" else "green"
            wanted = r.target_true if kind == "unrelated" else r.target_new
            mark = "[green]✓[/green]" if starts_with_target(a[0], wanted) else "[red]✗[/red]"
            table.add_row(f"[{style}]{kind}[/{style}] {prompt}", f"{b[0].strip()!r}\n-> {a[0].strip()!r} {mark}",
                          f"{b[1]:.2f} -> {a[1]:.2f}", f"{b[2]:.2f} -> {a[2]:.2f}")
        table.add_section()
    console.print(table)
    console.print("[green]edit[/green] and [green]paraphrase[/green] rows should now say the new answer; "
                  "[cyan]unrelated[/cyan] rows (other subjects, same relation) should keep the true one "
                  "(✓: the greedy answer starts with it).")


def run_demo(model_spec: str = "demo", recipe: str = DEMO_RECIPE, console: Console | None = None) -> dict:
    console = console or default_console
    start = time.perf_counter()
    with console.status(f"loading {model_spec} (the first run dequantizes the GGUF once, about a minute)"):
        model, tok, identity = load_model(model_spec)
    console.print(f"[bold]model[/bold] {identity.model_class}, {identity.num_parameters:,} parameters, "
                  f"{identity.dtype} on {next(model.parameters()).device}")
    requests = load_requests(resource("demo_edits.json")).requests
    show_top_predictions(console, model, tok, requests)

    before = snapshot(model, tok, requests)
    pre = evaluate_requests(model, tok, requests, progress=False).summary
    spec = get_method(recipe)
    config = spec.resolve_config()
    pool = load_pool_facts(config.augment.pool) if spec.recipe and config.augment.pool else None
    console.print(f"[bold]editing[/bold] {len(requests)} COUNTERFACT facts with [bold]{recipe}[/bold]: "
                  f"{' '.join(config.description.split()) if spec.recipe else 'a closed-form baseline'}")
    result = apply_spec(spec, config, model, tok, requests, ApplyContext(
        pool=pool, progress=True, model_fingerprint=identity.fingerprint, identity=identity))
    location = result.location or {}
    if "why" in location:
        console.print(f"[bold]location[/bold] layer {location['layer']} {location['module']}: {location['why']}")
    console.print(f"changed {result.trainable_parameters:,} parameters in "
                  f"{', '.join(t.name for t in result.touched)} on {result.examples_by_kind} examples "
                  f"in {result.phase_seconds.get('train', result.seconds):.0f}s")
    after = snapshot(result.model, tok, requests)
    post = evaluate_requests(result.model, tok, requests, progress=False).summary
    show_before_after(console, requests, before, after)
    keys = ("efficacy", "generalization", "locality", "edit_score")
    console.print("COUNTERFACT protocol on these edits (ES/PS/NS, edit score): before "
                  + " / ".join(f"{pre[k]:.0f}" for k in keys) + ", after "
                  + " / ".join(f"{post[k]:.0f}" for k in keys))
    console.print(f"total {time.perf_counter() - start:.0f}s")
    return {"pre": pre, "post": post, "before": before, "after": after, "location": location}


def demo_command(
    model: Annotated[str, typer.Option(help="Model to edit (default: the bundled gemma-3-270m).")] = "demo",
    recipe: Annotated[str, typer.Option(help="Editing recipe (see `ftedit recipes`).")] = DEFAULT_RECIPE,
) -> None:
    """Edit 4 COUNTERFACT facts in gemma-3-270m the default way; show what it says before and after."""
    run_demo(model, recipe)
