"""``python -m ftedit ...``: the command line (torchrun starts it this way)."""

from ftedit.commands import main

main()
