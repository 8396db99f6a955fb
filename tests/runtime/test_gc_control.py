"""runtime.core.loop.GarbageCollection: Megatron-LM's manual GC (the plan's `Execution.host`) and the
collection measurements the GC cost term is read from (metrics `gc_collections`, `gc_pause_s`)."""

from __future__ import annotations

import gc

from nemoc.compiler.plan import HostExecution
from nemoc.runtime.core.loop import GarbageCollection


def _garbage(n: int = 2000) -> None:
    for _ in range(n):
        a = []
        a.append(a)  # a reference cycle only the collector frees


def test_manual_gc_disables_the_collector_and_collects_at_the_interval():
    assert gc.isenabled()
    with GarbageCollection(HostExecution("none", (), True, 3)) as c:
        assert not gc.isenabled()
        c.take()  # the collection at the start
        _garbage()
        for step in (1, 2):
            c.after_step(step)
        count, full, seconds = c.take()
        assert (count, full) == (0, 0)  # no automatic collection, none before the interval
        c.after_step(3)
        count, full, seconds = c.take()
        assert (count, full) == (1, 1) and seconds > 0.0
    assert gc.isenabled()


def test_manual_gc_interval_zero_never_collects_in_training():
    with GarbageCollection(HostExecution("none", (), True, 0)) as c:
        c.take()
        _garbage()
        for step in range(1, 200):
            c.after_step(step)
        assert c.take()[:2] == (0, 0)
    assert gc.isenabled()


def test_automatic_gc_stays_on_and_its_collections_are_measured():
    with GarbageCollection(HostExecution("none", (), False, 0)) as c:
        assert gc.isenabled()
        _garbage(20000)  # enough allocations for generation-0 collections
        count, full, seconds = c.take()
        assert count > 0 and seconds >= 0.0
    with GarbageCollection(None) as c:  # a model built outside a stage plan: Python's default
        assert gc.isenabled()
    assert gc.callbacks.count(c._callback) == 0
