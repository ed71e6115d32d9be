"""``ftedit generate``: greedy answers of any model, through the chat template for instruct models."""

from __future__ import annotations

from typing import Annotated

import typer

from ftedit.commands import options
from ftedit.commands.console import console


def generate_command(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    model: Annotated[str, typer.Option(help="Model: an edit's OUT/model, bundled name, HF dir, .gguf or hub name.")
                     ] = "demo",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy).")] = 24,
    chat_template: Annotated[bool, typer.Option(
        "--chat-template/--no-chat-template", help="Wrap prompts in the tokenizer's chat template when it has one "
                                                   "(instruct models).")] = True,
    device: options.Device = None,
    dtype: options.Dtype = "auto",
) -> None:
    """Greedy answers of any model to PROMPTS (as chat turns for instruct models)."""
    from ftedit.evaluate.answers import generate_answers
    from ftedit.models import load_model
    from ftedit.tokenization import has_chat_template

    loaded, tok, _ = load_model(model, device=device, dtype=dtype)
    chat = chat_template and has_chat_template(tok)
    console.print(f"[dim]{model}: greedy, {max_new_tokens} tokens, "
                  f"{'chat template' if chat else 'plain text'}[/dim]")
    for prompt, text in zip(prompts, generate_answers(loaded, tok, prompts, max_new_tokens, chat), strict=True):
        console.print(f"[bold]{prompt}[/bold] -> {text!r}")
