"""nemoc.runtime: what executes a compiled plan, in three layers.

`cli/` (the `nemoc` commands) -> `orchestrate/` (executor, run directory, task kinds, launchers) ->
the training runtime (`train.py`, `align/`, `core/`, `megatron_args.py`, ...), which the launchers
start as separate processes that read a task file and the plan it names (docs/architecture.md).
"""
