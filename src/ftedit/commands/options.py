"""Options several commands share, declared once (typer reads the option name from each parameter's name)."""

from __future__ import annotations

from typing import Annotated

import typer

Model = Annotated[str, typer.Option(help="Base model: demo, smollm2, HF dir, .gguf file or hub name.")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available).")]
Dtype = Annotated[str, typer.Option(help="auto (CUDA: bf16; CPU: fp32 weights under bf16 autocast where the CPU has bf16 units) | fp32 (exact) | bf16 | fp16.")]
Progress = Annotated[bool, typer.Option(help="Show progress bars.")]
