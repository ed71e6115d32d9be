"""``ftedit demo``: edit a few real COUNTERFACT facts in the bundled gemma-3-270m and show before and after.

The demo takes the default path of ``ftedit edit``: the default recipe, its location from the shipped
calibration result (no search), locality facts from the shipped pool.
"""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.table import Table

from ftedit.calibration import resource
from ftedit.config import DEFAULT_RECIPE, resolve_config
from ftedit.data.loaders import load_pool_facts, load_requests
from ftedit.data.requests import EditRequest
from ftedit.editor import edit
from ftedit.evaluate import evaluate_requests, next_token_topk, score_pairs
from ftedit.evaluate.answers import generate_answers, starts_with_target
from ftedit.locate import resolve_location
from ftedit.models import load_model

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
    console = console or Console()
    start = time.perf_counter()
    with console.status(f"loading {model_spec} (the first run dequantizes the GGUF once, about a minute)"):
        model, tok, identity = load_model(model_spec)
    console.print(f"[bold]model[/bold] {identity.model_class}, {identity.num_parameters:,} parameters, "
                  f"{identity.dtype} on {next(model.parameters()).device}")
    requests = load_requests(resource("demo_edits.json")).requests
    show_top_predictions(console, model, tok, requests)

    before = snapshot(model, tok, requests)
    pre = evaluate_requests(model, tok, requests, progress=False).summary
    config = resolve_config(recipe)
    pool = load_pool_facts(config.augment.pool) if config.augment.pool else None
    config, location = resolve_location(model, tok, config, identity)
    if location:
        console.print(f"[bold]location[/bold] layer {location['layer']} {location['module']}: {location['why']}")
    console.print(f"[bold]editing[/bold] {len(requests)} COUNTERFACT facts with recipe [bold]{recipe}[/bold]: "
                  f"{' '.join(config.description.split())}")
    result = edit(model, tok, requests, config, pool=pool, model_fingerprint=identity.fingerprint)
    console.print(f"trained {result.trainable_parameters:,} parameters in "
                  f"{', '.join(t['name'] for t in result.targets)} on {result.examples_by_kind} examples "
                  f"in {result.seconds['train']:.0f}s")
    after = snapshot(result.model, tok, requests)
    post = evaluate_requests(result.model, tok, requests, progress=False).summary
    show_before_after(console, requests, before, after)
    keys = ("efficacy", "generalization", "locality", "edit_score")
    console.print("COUNTERFACT protocol on these edits (ES/PS/NS, edit score): before "
                  + " / ".join(f"{pre[k]:.0f}" for k in keys) + ", after "
                  + " / ".join(f"{post[k]:.0f}" for k in keys))
    console.print(f"total {time.perf_counter() - start:.0f}s")
    return {"pre": pre, "post": post, "before": before, "after": after, "location": location}
