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
"""

from __future__ import annotations

from contextlib import contextmanager


class ParamGather:
    """The forward pre-hooks of the overlapped parameter all-gather, switched as Megatron-LM's train().
    `config.param_sync_func` is set exactly while the hooks are on (the schedule's asynchronous starts need
    the hooks' waits)."""

    def __init__(self, chunks: list, config=None) -> None:
        self.chunks = [c for c in chunks if getattr(c, "use_forward_hook", False)]
        self.config = config
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

    def _disable(self, *, gather: bool) -> None:
        for chunk in self.chunks:
            chunk.disable_forward_pre_hook(param_sync=gather)  # gather: start_param_sync(force_sync=True)
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
