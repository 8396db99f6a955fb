"""Layering: nemoc.dsl and nemoc.compiler import neither torch nor megatron (nor do check/fmt)."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import importlib, pkgutil, sys
import nemoc.dsl, nemoc.compiler, nemoc.grammar
names = []
for package in (nemoc.grammar, nemoc.dsl, nemoc.compiler):
    names.append(package.__name__)
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        names.append(info.name)
for name in names:
    importlib.import_module(name)
import nemoc.runtime.cli.common, nemoc.runtime.cli.lang
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "megatron", "transformer_engine"))
print(len(names))
print(",".join(heavy))
"""


def test_dsl_and_compiler_import_neither_torch_nor_megatron():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, heavy = out.stdout.splitlines()
    assert int(count) >= 10  # the walk really found the modules
    assert heavy == "", f"imported: {heavy}"


def test_importing_the_dsl_does_not_pull_in_the_cli_stack():
    probe = "import sys, nemoc.dsl.parser, nemoc.dsl.format, nemoc.dsl.loader; " \
            "print(','.join(m for m in ('rich', 'click') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_the_compiler_names_no_runtime_file():
    """What the runtime can run reaches the compiler as data (compiler/target.py's Target), never as
    references to runtime code that would have to be kept equal to it by hand."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "compiler"
    hits = [f"{p.relative_to(root.parent)}:{i}" for p in sorted(root.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if "runtime/" in line]
    assert not hits, hits
