"""`python -m retrocli`: the `retro` command (what torchrun's `-m retrocli train …` runs)."""

from retrocli.cli import main

main()
