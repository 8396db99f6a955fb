"""The eval stage's held-out split: the records of a data set that no stage upstream trained on.

Input:  the eval task (its plan: every stage's kind, `after`, data names and seed), one data set entry of
        task.json and its records as the alignment readers return them (one per JSONL record, in order).
Output: `held_out(task, entry, records)` -> (held-out records, how they were chosen).
Invariants: an alignment stage trains on the records `stage.split_held_out(records, fraction, seed)` puts
        on its training side (the data set's validation fraction, the stage's seed). The eval stage scores
        only records that *every* upstream stage training on that data set held out, and drops those equal
        (by value) to a trained record (a data file that repeats a record would otherwise score a trained
        copy as held out: `runtime/heldout.py`). A data set no upstream stage trained on is held out whole.
"""

from __future__ import annotations

import json

from nemoc.dsl.schema import TRAINING_KINDS
from nemoc.runtime.align import stage


def upstream_trainers(task, data_name: str) -> list:
    """The stages above the eval stage (transitively through `after`) that train on `data_name`."""
    out = [sp for sp in stage.upstream(task) if sp.kind in TRAINING_KINDS and data_name in sp.data]
    return sorted(out, key=lambda sp: sp.name)


def _key(record) -> str:
    return json.dumps(record, sort_keys=True, default=repr)


def held_out(task, entry: dict, records: list) -> tuple[list, str]:
    trainers = upstream_trainers(task, entry.get("name"))
    if not trainers:
        return list(records), "whole data set (no upstream stage trained on it)"
    fraction = stage.validation_fraction(entry)
    index = list(range(len(records)))
    kept, trained = set(index), set()
    for sp in trainers:
        train, val = stage.split_held_out(index, fraction, sp.seed)
        kept &= set(val)
        trained |= set(train)
    seen = {_key(records[i]) for i in trained}
    chosen = [records[i] for i in sorted(kept) if _key(records[i]) not in seen]
    names = ", ".join(f"{sp.name} (seed {sp.seed})" for sp in trainers)
    return chosen, (f"the validation share ({fraction:.0%}) held out by {names}, without records equal to trained ones")
