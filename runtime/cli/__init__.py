"""The `nemoc` command line: one module per group of commands, loaded lazily by `main.py`.

`main.py` (the click group and `main`, the console script), `common.py` (loading a file into a spec,
rendering diagnostics, exit codes: the only place that prints them), `lang.py` (check, fmt), `plan.py`,
`run.py` (graph, run, status), `cluster.py` (logs, cancel), `interop.py` (import, export, presets),
`report.py`, `lsp.py` (the language server). Commands hand files to the compiler and plans to the
orchestration (`nemoc.runtime.orchestrate`); none of them trains.
"""

from nemoc.runtime.cli.main import cli, main  # click only: the commands load when invoked

__all__ = ["cli", "main"]
