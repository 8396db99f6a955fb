"""The `nemoc` command line.

The CLI lives in the runtime package because it is the top of the layering (dsl <- compiler <- runtime)
and `run` needs all three. Commands are defined in their own modules and loaded lazily, so
`nemoc check` / `nemoc plan` never import torch or Megatron-Core.

Exit codes, for every command: 0 success, 1 diagnostics (the experiment is wrong, does not fit, or a
task failed), 2 usage error or an unreadable file.
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" of a click.Command
COMMANDS = {
    "check": "nemoc.runtime.cli.lang:check",
    "fmt": "nemoc.runtime.cli.lang:fmt",
    "plan": "nemoc.runtime.cli.plan:plan",
    "graph": "nemoc.runtime.cli.run:graph",
    "run": "nemoc.runtime.cli.run:run",
    "status": "nemoc.runtime.cli.run:status",
    "logs": "nemoc.runtime.cli.cluster:logs",
    "cancel": "nemoc.runtime.cli.cluster:cancel",
    "lsp": "nemoc.runtime.cli.lsp:lsp",
    "import": "nemoc.runtime.cli.interop:import_",
    "export": "nemoc.runtime.cli.interop:export",
    "presets": "nemoc.runtime.cli.interop:presets",
    "report": "nemoc.runtime.cli.report:report",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ModuleNotFoundError, AttributeError) as exc:
            if module in str(exc) or isinstance(exc, AttributeError):
                return None  # command not built in this checkout
            raise


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nemoc")
def cli() -> None:
    """nemoc: compile and run declarative LLM-training experiments (.nemo files)."""


def main() -> None:
    cli(prog_name="nemoc")


if __name__ == "__main__":
    main()
