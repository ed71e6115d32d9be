"""The rich console every command prints to (logging goes to stderr)."""

from rich.console import Console

console = Console()
