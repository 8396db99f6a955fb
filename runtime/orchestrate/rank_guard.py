"""A rank's first moments under the local launcher: `python -m nemoc.runtime.orchestrate.rank_guard MODULE TASK_JSON ...`.

torchrun starts this in place of MODULE. It (1) asks the kernel to SIGKILL this rank if its parent,
torchrun, dies (prctl PR_SET_PDEATHSIG; torchrun itself gets SIGTERM when `nemoc run` dies), so a
`kill -9` of the launcher or of torchrun never leaves ranks training unsupervised; (2) records this
process under the task directory's `procs/` (runtime/orchestrate/procs.py), the only list `nemoc cancel` signals;
then (3) runs MODULE as `__main__` with `sys.argv = [MODULE, TASK_JSON, ...]`, exactly as `python -m
MODULE` would. SIGKILL, not SIGTERM: a rank whose torchrun is gone has no one left to coordinate a
graceful stop with; the last periodic checkpoint is what a rerun resumes from.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3:
        sys.stderr.write("usage: python -m nemoc.runtime.orchestrate.rank_guard MODULE TASK_JSON [ARGS...]\n")
        raise SystemExit(2)
    module, args = sys.argv[1], sys.argv[2:]
    from nemoc.runtime.orchestrate import procs

    procs.set_parent_death_signal(signal.SIGKILL, parent=os.getppid())
    try:
        procs.record(Path(args[0]).resolve().parent, "rank")
    except OSError as exc:  # the run directory is unwritable: the task itself will say so
        sys.stderr.write(f"warning: could not record rank process {os.getpid()}: {exc}\n")
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
