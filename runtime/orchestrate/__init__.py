"""Orchestration: what runs the compiled graph's tasks, apart from what trains.

`executor.py` (the runtime graph -> task files, in dependency order, cached by content hash),
`rundir.py` (the run directory: plan snapshots, status.json, locks), `tasks/` (the task kinds: how
each is prepared, inline or launched, and with which module), `launchers.py` (the launcher interface),
`launch_local.py` (torchrun), `launch_slurm.py` (sbatch chains), `launch_k8s.py` (PyTorchJobs),
`procs.py` and `rank_guard.py` (process trees), `sweep.py` (one run directory per sweep point).
Training entry points (`python -m nemoc.runtime.train`, `nemoc.runtime.align`) read only the task file
and the plan it names and never import this package (data preparation, which `nemoc run` runs inline,
takes its workers' parent-death signal from `procs`).
"""
