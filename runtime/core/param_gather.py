"""The distributed optimizer's overlapped parameter all-gather in the training loop, driven as Megatron-LM's
train() drives it (megatron/training/training.py: `should_disable_forward_pre_hook`,
`enable_forward_pre_hook` / `disable_forward_pre_hook`, `force_param_sync` before a save).

Input:  the stage's model chunks (Megatron DDP with `overlap_param_gather`, built by runtime.model.wrap_ddp)
and the TransformerConfig whose `param_sync_func` the interleaved schedule calls (`align_param_gather`).
Output: `ParamGather`, the loop's switch of the forward pre-hooks.
Invariants: with DDP `overlap_param_gather` the optimizer step updates only this rank's shard of the
parameters (distrib_optimizer.py `step_with_ready_grads` launches no all-gather); the next step's forward
pre-hooks (interleaved: the schedule's `param_sync_func`, then the hooks wait) gather them bucket by bucket
while the forward runs. Anything that reads the parameters outside a training step -- validation, a
checkpoint save, the caller after the loop -- must first gather them: `synced()` and `release()` do.
  * `hold()`, before the first step: hooks off without a gather, `param_sync_func` removed. The first
    step's parameters are the loaded or initialised ones, the same on every rank (Megatron-LM holds the
    hooks back so that an error in loading does not spread through the first all-gather).
  * `after_step(ok)`: after the first step that moved the optimizer (a skipped fp16 step does not), hooks
    on and `param_sync_func` back.
  * `synced()`: a context in which the parameters are whole on every rank (hooks off with a synchronous
    all-gather, on again after): validation, checkpoint saves.
  * `release()`: the loop's normal end: hooks off with a gather, so the model leaves the loop whole and
    hook-free (the final save, export and generation read it as plain modules).
  * `abandon()`: the loop raised: hooks off with no gather (a collective a failed rank must not enter).
Every method is a no-op when the chunks do not overlap the gather (`use_forward_hook` unset: no
distributed optimizer, `overlap_param_gather = false`, Megatron-FSDP).

MXFP8 parameters all-gathered through the gradient buffer (DDP `reuse_grad_buf_for_mxfp8_param_ag`): the
parameter buffer is the gradient buffer, not param.data, and with `overlap_param_gather` Megatron-Core 0.16.1's
step writes the updated main parameters nowhere (optimizer.py `step_with_ready_grads`: "copy is manually called
in the training loop"). So, as Megatron-LM does:
  * `before_forward()`, each step after `zero_grad_buffer` while the hooks are on: every distributed
    optimizer's `_copy_main_params_to_param_buffer()` (training.py train_step; not while the hooks are held
    back, nor right after a forced gather: the parameters are already in param.data, and no pre-hook would
    gather and zero the buffer before the gradients accumulate in it);
  * a forced gather (`synced()`, `release()`): the gradient buffer zeroed and the main parameters staged into
    it first (newer Megatron-Core's `prepare_model_params_for_param_sync`), and after the synchronous
    all-gather each parameter copied from the buffer into param.data, the buffer zeroed again (what 0.16.1's
    `start_param_sync` does only without `overlap_param_gather`, distributed_data_parallel.py; with it, only
    the pre-hooks' `finish_param_sync` copies).
"""

from __future__ import annotations

from contextlib import contextmanager


class ParamGather:
    """The forward pre-hooks of the overlapped parameter all-gather, switched as Megatron-LM's train().
    `config.param_sync_func` is set exactly while the hooks are on (the schedule's asynchronous starts need
    the hooks' waits)."""

    def __init__(self, chunks: list, config=None, optimizer=None) -> None:
        self.chunks = [c for c in chunks if getattr(c, "use_forward_hook", False)]
        self.config = config
        self.optimizer = optimizer
        # MXFP8 parameters gathered through the gradient buffer: the loop stages the main parameters into it
        self.through_grad_buffer = any(getattr(c.ddp_config, "reuse_grad_buf_for_mxfp8_param_ag", False)
                                       for c in self.chunks)
        self.enabled = bool(self.chunks) and all(c.remove_forward_pre_hook_handles for c in self.chunks)
        if self.active and not self.enabled and config is not None:
            config.param_sync_func = None

    @property
    def active(self) -> bool:
        return bool(self.chunks)

    @property
    def aligned(self) -> bool:
        """The interleaved schedule starts the gathers (`align_param_gather`), not the first pre-hooks."""
        return self.active and bool(self.chunks[0].ddp_config.align_param_gather)

    def _sync_func(self):
        """What Megatron-LM's setup sets (training.py: with `align_param_gather` only): each chunk's
        `start_param_sync`, for the interleaved schedule to call."""
        if not self.aligned:
            return None
        return self.chunks[0].start_param_sync if len(self.chunks) == 1 else [c.start_param_sync for c in self.chunks]

    def _enable(self) -> None:
        for chunk in self.chunks:
            chunk.enable_forward_pre_hook()
        if self.config is not None:
            self.config.param_sync_func = self._sync_func()
        self.enabled = True

    def _distributed_optimizers(self) -> list:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return [o for o in optimizers if isinstance(o, DistributedOptimizer)]

    def _stage_main_params(self) -> None:
        """The updated main parameters into the parameter buffer (the gradient buffer): each rank's shard."""
        optimizers = self._distributed_optimizers()
        if not optimizers:
            raise RuntimeError("MXFP8 parameters gathered through the gradient buffer need the stage's distributed "
                               "optimizer, which the loop did not pass (ParamGather(optimizer=...))")
        for optimizer in optimizers:
            optimizer._copy_main_params_to_param_buffer()

    def _copy_gathered_params(self) -> None:
        """After a forced gather through the gradient buffer: each parameter from the buffer into param.data
        (cast to the parameter's dtype), the buffer zeroed for the gradients (0.16.1's `start_param_sync`
        without overlap, distributed_data_parallel.py)."""
        for chunk in self.chunks:
            for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
                for bucket in group.buckets:
                    for param in bucket.params:
                        start, end = bucket.param_to_index[param]
                        param.data.copy_(bucket.param_data.view(-1)[start:end].view(param.data.shape))
                    bucket.param_data.zero_()

    def _gather_pending(self) -> bool:
        """Whether this step's pre-hooks will all-gather: not after a forced gather (a save, validation), which
        leaves every bucket group `param_gather_dispatched` until the next backward's `finish_grad_sync`, so
        that the next forward's pre-hooks neither gather nor copy nor zero the buffer."""
        return any(not group.param_gather_dispatched for chunk in self.chunks
                   for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups)

    def before_forward(self) -> None:
        """A training step, after `zero_grad_buffer`: with the hooks on and the gather through the gradient
        buffer, the main parameters the last step updated go into it for the pre-hooks to gather (Megatron-LM
        train_step). Not when a forced gather already put them into param.data: no pre-hook would gather and
        zero them, and MXFP8's gradients would accumulate on top of them in the shared buffer."""
        if self.through_grad_buffer and self.enabled and self._gather_pending():
            self._stage_main_params()

    def _disable(self, *, gather: bool) -> None:
        through_buffer = gather and self.through_grad_buffer
        if through_buffer:  # the buffer holds the last step's (used) gradients: zeroed, then the main parameters
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
            self._stage_main_params()
        for chunk in self.chunks:
            chunk.disable_forward_pre_hook(param_sync=gather)  # gather: start_param_sync(force_sync=True)
        if through_buffer:
            self._copy_gathered_params()
        if self.config is not None:
            self.config.param_sync_func = None
        self.enabled = False

    def hold(self) -> None:
        """Before the first step: hooks off, no gather (every rank holds the same whole parameters)."""
        if self.enabled:
            self._disable(gather=False)

    def after_step(self, ok: bool) -> None:
        """After a step that moved the optimizer: the next forward gathers the updated shards."""
        if ok and self.active and not self.enabled:
            self._enable()

    @contextmanager
    def synced(self):
        """The parameters whole on every rank for the body (validation, a save); hooks as before after."""
        was_enabled = self.enabled
        if was_enabled:
            self._disable(gather=True)
        try:
            yield
        finally:
            if was_enabled:
                self._enable()

    def release(self) -> None:
        """The loop is done: gather what the last step updated, and leave the hooks off."""
        if self.enabled:
            self._disable(gather=True)

    def abandon(self) -> None:
        """The loop failed: hooks off without the gather. The gather is a collective over the data-parallel
        ranks; a rank that raised alone would wait in it for ranks that never join, where it must fail at
        once (Megatron-LM gathers only before a save and at the normal end of training, never on an error)."""
        if self.enabled:
            self._disable(gather=False)
