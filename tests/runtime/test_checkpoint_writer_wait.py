"""The blocking wait for async checkpoint writers (Checkpointer._await_writers), on two gloo processes with
Megatron-Core's own AsyncCallsQueue and forked writers:

* a writer slower than the process-group timeout (a busy disk) no longer ends the job: Megatron's blocking
  finalize alone (join, then collectives) times out on the rank whose writer finished first;
* a writer that does no I/O for `stall_s` prints its Python stack, and for 4 x `stall_s` fails the save
  on every rank, naming the rank, stopped and removed so that close() returns at once; a writer that
  reads its shards back (the digest pass) for longer than `stall_s` is not failed;
* a writer that finished its files and digests but does not exit is stopped, and the save completes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # five pairs of gloo processes (~1.3 min)

WORKER = textwrap.dedent('''
    import datetime, json, os, sys, time
    from functools import partial
    import torch
    import torch.distributed as dist
    from nemoc.runtime import mcore_cpu
    mcore_cpu.apply()
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
    from nemoc.runtime import checkpoint as ckpt
    from nemoc.runtime.faults import run_as_helper

    rank, world, store, root, mode, use_ours = sys.argv[1], 2, sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
    rank = int(rank)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=3))

    def slow_writer(seconds, tmp, rank):
        time.sleep(seconds)
        open(os.path.join(tmp, f"__{rank}_0.distcp"), "w").write("x")

    def write_then_read(tmp, rank):  # a quick write, then 5 s of reading it back (like the digest pass)
        path = os.path.join(tmp, f"__{rank}_0.distcp")
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20))
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            with open(path, "rb") as f:
                f.read()
            time.sleep(0.2)

    def done_but_stuck(tmp, rank):
        open(os.path.join(tmp, f"__{rank}_0.distcp"), "w").write("x")
        ckpt.write_text_atomic(os.path.join(tmp, ckpt._SIDECAR.format(rank=rank)), "{}")
        time.sleep(3600)

    saver = ckpt.Checkpointer(root=root, keep=2, async_save=True, stall_s=1.5 if mode in ("stall", "reading") else 60.0)
    saver.EXIT_GRACE_S = 1.0
    record = ckpt.SaveRecord(5, os.path.join(root, "iter_0000005"), time.monotonic(), True)
    tmp = record.path + ".tmp"
    if rank == 0:
        os.makedirs(tmp, exist_ok=True)
    dist.barrier()
    if mode == "slow":  # rank 0's writer takes 8 s, longer than the 3 s process-group timeout
        fn = partial(run_as_helper, os.getpid(), slow_writer, 8.0 if rank == 0 else 0.0, tmp, rank)
    elif mode == "stall":  # rank 1's writer never writes
        fn = partial(run_as_helper, os.getpid(), time.sleep, 3600 if rank == 1 else 0.0)
    elif mode == "reading":
        fn = partial(run_as_helper, os.getpid(), write_then_read, tmp, rank)
    else:
        fn = partial(run_as_helper, os.getpid(), done_but_stuck, tmp, rank)
    finished = []
    request = AsyncRequest(fn, (), [lambda: finished.append(1)])
    saver._in_flight = record
    saver._queue.schedule_async_request(request)
    started = time.monotonic()
    try:
        if use_ours:
            saver.maybe_finalize(blocking=True)
        else:
            saver._queue.maybe_finalize_async_calls(blocking=True)
    except Exception as exc:
        print(f"RESULT rank {rank} error {type(exc).__name__}: {exc}", flush=True)
        if use_ours:  # what train.py does next: close() must return at once, the writer gone
            closing = time.monotonic()
            saver.close()
            print(f"CLOSED rank {rank} {time.monotonic() - closing:.1f} {os.path.exists(tmp)}", flush=True)
        os._exit(3)
    print(f"RESULT rank {rank} ok {len(finished)} {time.monotonic() - started:.1f}", flush=True)
    os._exit(0)
''')


def _run(tmp_path: Path, mode: str, ours: bool) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    store = tmp_path / f"store_{mode}_{int(ours)}"
    root = tmp_path / f"ckpt_{mode}_{int(ours)}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(store), str(root), mode, "1" if ours else "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(2)]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _result(proc: subprocess.CompletedProcess) -> str:
    return next((line for line in proc.stdout.splitlines() if line.startswith("RESULT")), proc.stderr[-2000:])


def test_a_writer_slower_than_the_collective_timeout_completes_the_save(tmp_path):
    theirs = _run(tmp_path, "slow", ours=False)  # Megatron's blocking finalize alone: rank 1 times out
    assert theirs[1].returncode == 3 and "Timed out" in _result(theirs[1]), [_result(p) for p in theirs]
    ours = _run(tmp_path, "slow", ours=True)
    assert [p.returncode for p in ours] == [0, 0], [_result(p) for p in ours]
    for p in ours:
        words = _result(p).split()
        assert words[3] == "ok" and words[4] == "1" and float(words[5]) >= 7.0, _result(p)  # finalized, after the writer


def test_a_stalled_writer_fails_the_save_on_every_rank_naming_it_with_its_stack(tmp_path):
    procs = _run(tmp_path, "stall", ours=True)
    assert [p.returncode for p in procs] == [3, 3], [_result(p) for p in procs]
    for p in procs:
        line = _result(p)
        assert "CheckpointSaveError: checkpoint save failed at step 5: the async checkpoint writer of rank 1 " \
               "did no I/O for 6 s" in line, line
        closed = next(x for x in p.stdout.splitlines() if x.startswith("CLOSED")).split()
        assert float(closed[3]) < 2.0 and closed[4] == "False", closed  # nothing left to wait for, .tmp removed
    assert "has done no I/O for" in procs[1].stdout, procs[1].stdout
    assert "in run_as_helper" in procs[1].stderr, procs[1].stderr[-2000:]  # faulthandler's dump of the writer


def test_a_writer_that_reads_its_shards_back_for_longer_than_the_stall_limit_is_not_failed(tmp_path):
    procs = _run(tmp_path, "reading", ours=True)  # 5 s of reads against a 1.5 s stall limit (failure at 6 s)
    assert [p.returncode for p in procs] == [0, 0], [_result(p) for p in procs]
    assert not any("has done no I/O" in p.stdout for p in procs), [p.stdout for p in procs]


def test_a_writer_that_finished_but_does_not_exit_is_stopped(tmp_path):
    procs = _run(tmp_path, "stuck", ours=True)
    assert [p.returncode for p in procs] == [0, 0], [_result(p) for p in procs]
    assert all("did not exit" in p.stdout for p in procs), [p.stdout for p in procs]
