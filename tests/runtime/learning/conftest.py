"""Tests of the alignment building blocks (runtime/objectives, generation, heldout, lora_peft): the
alignment tests' fixtures (a 1-process gloo group, one intra-op thread) and their tiny model specs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ALIGN_TESTS = Path(__file__).resolve().parents[1] / "align"
sys.path.insert(0, str(ALIGN_TESTS))  # align_helpers: the tiny model specs

_spec = importlib.util.spec_from_file_location("_align_conftest", ALIGN_TESTS / "conftest.py")
_align = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_align)
mcore, _one_thread = _align.mcore, _align._one_thread
