"""How the numbers nemoc prints read to a person (the plan report, the HTML report, sweeps)."""

from __future__ import annotations

GIB = 1 << 30


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
