"""runtime/mcore_fixes.py's `_GatherSummingSharedKey` on two gloo processes, fast: rank r's input gradient is its
slice of the gathered gradient with the last `shared` columns summed over both ranks. Width 10 split over 2 ranks
(5 each) with 7 shared columns, so the shared columns span both shards: a backward summing the wrong columns, or
splitting before summing, fails (review finding: the one-process test could not see either)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WIDTH, SHARED = 10, 7


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from nemoc.runtime import mcore_cpu
        from nemoc.runtime.mcore_fixes import _GatherSummingSharedKey

        mcore_cpu.apply()
        group = dist.new_group([0, 1])
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(3, 2, WIDTH // 2, generator=gen, requires_grad=True)
        y = _GatherSummingSharedKey.apply(x, SHARED, group)
        g = torch.randn(3, 2, WIDTH, generator=torch.Generator().manual_seed(100 + rank))
        y.backward(g)
        out[rank] = (x.detach().clone(), y.detach().clone(), g, x.grad.clone())
    finally:
        dist.destroy_process_group()


def test_the_gather_sums_the_shared_columns_across_two_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
        results = dict(out)
    (x0, y0, g0, grad0), (x1, y1, g1, grad1) = results[0], results[1]
    assert torch.equal(y0, torch.cat([x0, x1], dim=-1)) and torch.equal(y1, y0)  # forward: the plain gather
    summed = g0.clone()
    summed[..., -SHARED:] = g0[..., -SHARED:] + g1[..., -SHARED:]
    for rank, grad in ((0, grad0), (1, grad1)):
        own = (g0 if rank == 0 else g1).clone()
        own[..., -SHARED:] = summed[..., -SHARED:]
        torch.testing.assert_close(grad, own[..., rank * WIDTH // 2:(rank + 1) * WIDTH // 2])
