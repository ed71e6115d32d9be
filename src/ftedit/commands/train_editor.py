"""``ftedit train-editor``: meta-train a MEND or MALMEN editor for a model (resumable), for ``--recipe mend|malmen``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ftedit.commands import options
from ftedit.commands.console import console


def train_editor_command(
    method: Annotated[str, typer.Option(help="mend | malmen.")] = "mend",
    model: options.Model = "demo",
    config: Annotated[Path | None, typer.Option(help="YAML/TOML file overriding the method's settings.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one setting, e.g. train.steps=300 or "
                                                   "net.layers=-2: (edit/bench need the same to find the editor).")]
    = None,
    editor: Annotated[Path | None, typer.Option(help="Write the editor here (default: ftedit's cache, keyed by the "
                                                     "model and settings, where edit and bench find it).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Training checkpoint file (default: in the cache).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint.")] = False,
    stop_after: Annotated[int | None, typer.Option(help="Stop after this many steps in all (then --resume).")] = None,
    seed: Annotated[int, typer.Option(help="Torch seed before the model is loaded.")] = 0,
    device: options.Device = None,
    dtype: options.Dtype = "auto",
    progress: options.Progress = True,
) -> None:
    """Train a hypernetwork editor on a training split (default: COUNTERFACT's counterfact-train.json)."""
    import torch

    from ftedit.baselines.editors import shift_rule, train_and_save
    from ftedit.models import load_model
    from ftedit.registry import get_method

    shift_rule(method)  # an unknown method fails before the model loads
    hparams = get_method(method).resolve_config(config, set_ or [])
    torch.manual_seed(seed)
    base, tok, _ = load_model(model, device=device, dtype=dtype)
    run = train_and_save(method, base, tok, hparams, editor=editor, checkpoint=checkpoint, resume=resume,
                         stop_after=stop_after, progress=progress)
    last = run.trained.history[-1] if run.trained.history else {}
    console.print(f"{method}: {run.trained.steps}/{hparams.train.steps} steps; last loss {last.get('loss', 'n/a')}")
    console.print(f"wrote {run.editor}" if run.editor else f"checkpoint {run.checkpoint}: rerun with --resume")
