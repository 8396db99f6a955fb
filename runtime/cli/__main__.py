"""`python -m nemoc.runtime.cli ...` (sweeps start each point's `nemoc run` so)."""

from nemoc.runtime.cli.main import main

main()
