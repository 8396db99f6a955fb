"""The training core: what every stage kind (pretrain, sft/lora, dpo/ipo, reward, ppo) runs on.

Input:  a compiled StagePlan (layout, optimizer, schedule, checkpoint policy) and a stage kind's
forward step (Megatron-Core's `forward_step_func(data_iterator, model) -> (output, loss_func)`).
Output: an initialised process group and model-parallel groups (`dist`), model chunks and the
Megatron optimizer (`build`), and the training loop on Megatron-Core's schedules (`loop`:
get_forward_backward_func -- no pipelining, 1F1B, interleaved -- with the NaN/Inf rerun, metrics,
periodic and final checkpoints, validation and the agreed stop signal).
Invariants: everything Megatron-Core is configured with comes from runtime.megatron_args; nothing
else in the runtime calls `initialize_model_parallel` (dist.init_distributed does); the CPU
adaptation (runtime.mcore_cpu) is applied when this package is imported, before any Megatron object.
"""

from __future__ import annotations

import os

# Megatron-Core's TP/SP communication overlap relies on kernels being issued in order: one hardware
# queue per device (read when the CUDA context is created, so it must be set before that).
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

from nemoc.runtime import mcore_cpu  # noqa: E402

# Applied at import time (not in main): the first torch_dist save starts a multiprocessing Manager
# that re-imports the entry module, and that process must be patched too. No-op when CUDA is available.
if mcore_cpu.apply():
    mcore_cpu.fork_checkpoint_results_queue()
