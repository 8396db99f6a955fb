"""Fixtures for the Hugging Face conversion tests: the alignment tests' own (one 1-process gloo group,
`mcore`; one intra-op thread), loaded from tests/runtime/align/conftest.py, and `hf_models` importable."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

_spec = importlib.util.spec_from_file_location("_align_conftest", HERE.parent / "align" / "conftest.py")
_align = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_align)
mcore = _align.mcore
_one_thread = _align._one_thread
