"""CUDA graphs in the training loop, driven as Megatron-LM's training loop drives them (the plan's
`Execution.host`; megatron_args refuses graphs on the CPU and without Transformer Engine's layers).

Input:  the stage's model chunks, optimizer and `HostExecution` (cuda_graph_impl, cuda_graph_scope), the
micro-batch shape the schedule sends.
Output: `StepGraphs`: the forward-backward function each training step calls, and `before_step()`, which
captures Transformer Engine's graphs once the warm-up steps have run.
  * `local`, per-layer scopes: nothing here. Megatron-Core's CudaGraphManager records the graphed layers
    during the first steps and captures them itself (schedules.py calls `create_cudagraphs()`).
  * `local`, `full_iteration`: the whole forward-backward step (every micro-batch and the gradient
    reduction of finalize_model_grads) under Megatron-Core's FullCudaGraphWrapper
    (megatron/core/full_cuda_graph.py): eager for `cuda_graph_warmup_steps` steps, captured at the next one,
    replayed from then on, its micro-batches copied into static buffers (Megatron-LM training.py train():
    `forward_backward_func = FullCudaGraphWrapper(forward_backward_func, cuda_graph_warmup_steps=...)`).
    The optimizer step stays outside the graph, as in Megatron-LM.
  * `transformer_engine`: Megatron-Core's TECudaGraphHelper collects every graphable TransformerLayer and,
    after `cuda_graph_warmup_steps` steps of this run, captures each layer x micro-batch with TE's
    make_graphed_callables (Megatron-LM training.py: `iteration - start_iteration ==
    args.cuda_graph_warmup_steps` -> `cuda_graph_helper.create_cudagraphs()`). megatron_args refuses graphs
    with `overlap_param_gather` (Megatron-LM switches the DDP forward pre-hooks around the capture), so the
    pre-hooks are never on here and no manual hooks are set up.
Invariants: without graphs (`cuda_graph_impl = none`) the step runs `get_forward_backward_func()` exactly
as before; validation always runs eagerly.
"""

from __future__ import annotations

from megatron.core.pipeline_parallel import get_forward_backward_func


class StepGraphs:
    """The forward-backward function of a run's training steps, with the stage's CUDA graphs."""

    def __init__(self, *, model: list, optimizer, host, seq_length: int, micro_batch: int):
        self.impl = host.cuda_graph_impl if host is not None else "none"
        self.scope = tuple(host.cuda_graph_scope) if host is not None else ()
        self.forward_backward = get_forward_backward_func()
        self.steps_run = 0
        self._te_helper = None
        if self.impl == "none":
            self.warmup = 0
            return
        from megatron.core.utils import get_model_config

        config = get_model_config(model[0])
        self.warmup = config.cuda_graph_warmup_steps
        if self.impl == "local" and "full_iteration" in self.scope:
            from megatron.core.full_cuda_graph import FullCudaGraphWrapper

            # its iteration counters, graphs and results are class attributes (one per process in 0.16.1):
            # a second run in this process (another stage, a rerun) starts from none, or it would replay
            # the first model's graph or never capture
            FullCudaGraphWrapper.curr_iteration = {"training": 0, "validation": 0}
            FullCudaGraphWrapper.cuda_graph = {"training": None, "validation": None}
            FullCudaGraphWrapper.result = {"training": None, "validation": None}
            self.forward_backward = FullCudaGraphWrapper(self.forward_backward, cuda_graph_warmup_steps=self.warmup)
        elif self.impl == "transformer_engine":
            from megatron.core.transformer.cuda_graphs import TECudaGraphHelper

            self._te_helper = TECudaGraphHelper(model=model, config=config, seq_length=seq_length,
                                                micro_batch_size=micro_batch, optimizers=[optimizer])

    @property
    def whole_step(self) -> bool:
        """The forward-backward step is one graph (cuda_graph_scope = [full_iteration])."""
        return self.impl == "local" and "full_iteration" in self.scope

    def before_step(self) -> bool:
        """Capture Transformer Engine's per-layer graphs when this run's warm-up steps are done. True when
        it captured them now."""
        helper = self._te_helper
        if helper is None or helper.graphs_created() or self.steps_run != self.warmup:
            return False
        helper.create_cudagraphs()
        return True

    def after_step(self) -> None:
        self.steps_run += 1
