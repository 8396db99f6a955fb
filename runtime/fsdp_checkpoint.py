"""Checkpoints of Megatron-FSDP stages in its `fsdp_dtensor` format (torch.distributed.checkpoint).

Megatron-Core 0.16.1's DistributedOptimizer over Megatron-FSDP's buffers saves only this format
(distrib_optimizer.py `sharded_state_dict`: "sharding_type ... is not supported with Megatron FSDP" for
every other), and the FSDP model's parameters are DTensors that the torch_dist path of runtime/checkpoint.py
cannot shard. So, as Megatron-LM does with `--ckpt-format fsdp_dtensor`: the model's state dict (one
DTensor per parameter, each rank its shard), the optimizer's (`distrib_optim_sharding_type = fsdp_dtensor`:
Adam's moments as DTensors keyed by parameter name, the param groups' settings), prepared for uneven shards
by Megatron-FSDP's `preprocess_state_dict_for_uneven_dtensor`, written with `torch.distributed.checkpoint`;
the scheduler, iteration, data position, layout and each rank's RNG state travel in the same save. A resume
under another data-parallel size is DCP's resharding of those DTensors (the RNG states then restart).

Later stages and export read the model of such a checkpoint as full tensors (`FullTensorReader`): DCP's
own planner reads every shard of a DTensor into one plain tensor in one process (`dcp.load(..., no_dist=True)`,
as `torch.distributed.checkpoint.format_utils.dcp_to_torch_save` does), one decoder layer at a time, under the
names of the GPTModel's state dict (Megatron-FSDP's `model.module.` prefix dropped): the names of a converted
Hugging Face directory (runtime/hf/convert.py), so the same slicing loads them into any TP/PP layout
(runtime/hf/load.py `load_full`) and the same mapping exports them (runtime/hf/trained.py).

An FSDP stage that starts from full weights (a torch_dist init_checkpoint, a converted Hugging Face checkpoint)
copies each rank's shard of each full tensor (`load_full_into_fsdp`); from an fsdp_dtensor one, DCP (`load_model`).

Input:  the stage's FullyShardedDataParallel chunk, its optimizer and scheduler.
Output: `training_state` (what `Checkpointer.save` writes when it carries `FORMAT`), `load` (in place),
        `load_model` / `load_full_into_fsdp` (an FSDP stage's initial weights), `FullTensorReader` (full tensors
        by GPTModel name, for later stages and export).
Invariants: every rank holds optimizer state for every parameter before a save or load: a parameter whose
shard is empty on a rank has no Adam state there (torch skips it), while the uneven-DTensor preparation
runs one collective per DTensor in key order, so the ranks' key sets must agree (`_fill_empty_shards`,
sorted keys). A resume needs the model-parallel sizes it was saved under (tp, pp, vp, cp, ep); the load is
in place, not all or nothing as runtime/checkpoint.py's torch_dist loads are (why, and why that is safe: `load`).
Saves are synchronous.
"""

from __future__ import annotations

import os
import re
import warnings

import torch

FORMAT = "fsdp_dtensor"
MARKER = "nemoc_format"  # the key that tells Checkpointer.save which writer a state dict needs
DTYPE_KEY = "nemoc_dtype"  # the training dtype, for the manifest (not saved by DCP: older checkpoints lack it)
MODEL_KEY = "model"  # the model's state dict in the save (`training_state`)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _fill_empty_shards(optimizer) -> None:
    """Adam state (zero moments, the optimizer's step) for the parameters whose shard is empty on this rank,
    so that every rank's optimizer state names every parameter (see the module's invariants), with the step
    count of the ranks that hold a shard (the largest), refreshed at every save."""
    inner = optimizer.optimizer
    steps = [float(st["step"]) for st in inner.state.values() if "step" in st]
    step = torch.tensor([max(steps) if steps else 0.0])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MAX)
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            local = p.to_local() if hasattr(p, "to_local") else p
            if "step" not in state:
                state.update(step=step[0].clone(), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            elif local.numel() == 0:
                # an empty shard never steps: its `step` (saved once for all ranks, DCP taking any rank's copy)
                # follows the ranks that do, else a resume could restore a stale count into Adam's bias correction
                state["step"] = step[0].clone()


class ReadError(RuntimeError):
    """torch.distributed.checkpoint could not read a checkpoint (a shard cut short, a key it lacks): its
    CheckpointException derives from BaseException, which a resume's fallback to an older checkpoint must see
    as an ordinary error."""


def _dcp_load(state: dict, **kwargs) -> None:
    """`dcp.load`, its CheckpointException (every rank's failures, with tracebacks) as one ReadError line."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, **kwargs)
    except CheckpointException as exc:
        failures = getattr(exc, "failures", None) or {}
        rank, failure = min(failures.items(), key=lambda kv: kv[0]) if failures else (None, exc)
        inner = failure[0] if isinstance(failure, tuple) else failure
        where = f" (rank {rank} of {len(failures)} failing)" if rank is not None else ""
        raise ReadError(f"torch.distributed.checkpoint could not read it{where}: {type(inner).__name__}: "
                        f"{str(inner).splitlines()[0] if str(inner) else ''}") from None


def _rng_key() -> str:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return f"rng_state_rank{rank}"


def training_state(*, chunks, optimizer, scheduler, iteration: int, consumed_samples: int, rng: dict, layout: dict,
                   is_loading: bool = False, extra: dict | None = None) -> dict:
    """The state dict of an FSDP training run (what is saved, and the template a load fills); `rng`: this rank's
    RNG states, `layout`: the process group's (runtime/checkpoint.py `rng_state`, `layout_key`)."""
    from megatron.core.distributed.fsdp.src.megatron_fsdp.uneven_dtensor import (
        preprocess_state_dict_for_uneven_dtensor,
    )

    model_sd = chunks[0].state_dict()
    state: dict = {MODEL_KEY: model_sd}
    if optimizer is not None:
        _fill_empty_shards(optimizer)
        opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                              metadata={"distrib_optim_sharding_type": FORMAT})
        opt_sd["state"] = dict(sorted(opt_sd["state"].items()))
        state["optimizer"] = opt_sd
    preprocess_state_dict_for_uneven_dtensor(state)
    state[_rng_key()] = rng
    state["common"] = dict(iteration=iteration, consumed_samples=consumed_samples, layout=layout,
                           nemoc=dict(extra or {}), format=FORMAT,
                           opt_param_scheduler=scheduler.state_dict() if scheduler is not None else {})
    state[MARKER] = FORMAT
    state[DTYPE_KEY] = training_dtype(chunks[0])
    return state


def training_dtype(chunk) -> str:
    """The torch dtype name a Megatron-FSDP chunk trains in (its config's bf16 / fp16; its checkpoint holds the
    fp32 main weights whatever this is): what an export writes by default, as for a torch_dist checkpoint."""
    from nemoc.runtime.model import unwrap

    config = unwrap(chunk).config
    return "bfloat16" if getattr(config, "bf16", False) else "float16" if getattr(config, "fp16", False) else "float32"


def save(state: dict, directory: str) -> None:
    """Write `state` (from `training_state`) into `directory` with torch.distributed.checkpoint (all ranks)."""
    import torch.distributed.checkpoint as dcp

    state = {k: v for k, v in state.items() if k not in (MARKER, DTYPE_KEY)}
    dcp.save(state, checkpoint_id=directory)


RESHARDABLE = ("dp", "world")  # layout keys a resume may change: DCP reshards the DP-sharded DTensors


def layout_change(saved_layout: dict, layout: dict, *, init: bool = False) -> str | None:
    """Why a resume (`init`: a stage's initial weights, `load_model`) cannot load an FSDP checkpoint saved under
    `saved_layout` now (None if it can): the model-parallel sizes must be the same; the data-parallel size may
    differ. A layout saved before etp was recorded had Megatron's default, the tensor size."""
    if saved_layout and "etp" not in saved_layout:
        saved_layout = dict(saved_layout, etp=saved_layout.get("tp", 1))
    fixed = sorted(k for k in set(saved_layout) | set(layout) if k not in RESHARDABLE
                   and saved_layout.get(k) != layout.get(k))
    if not fixed:
        return None
    said = ", ".join(f"{k} {saved_layout.get(k)} -> {layout.get(k)}" for k in fixed)
    if init:
        return (f"it was saved by Megatron-FSDP (fsdp_dtensor) with layout {saved_layout}, this stage runs {layout} "
                f"({said}): a Megatron-FSDP stage starts from an fsdp_dtensor checkpoint only under the tensor/"
                "pipeline/context/expert sizes that saved it (the data-parallel size may change); give this stage "
                "those sizes, or run it with megatron_fsdp = false (which reads it as full tensors at any layout)")
    return (f"it was saved by Megatron-FSDP (fsdp_dtensor) with layout {saved_layout}, now {layout} ({said}): an "
            "FSDP stage resumes under the tensor/pipeline/context/expert sizes that saved it (the data-parallel "
            "size may change); to continue from its weights under this layout, start a new stage from it "
            "(`after` / init_checkpoint)")


def load(path: str, *, chunks, optimizer, scheduler, saved_layout: dict, rng: dict,
         layout: dict) -> tuple[int, int, dict | None]:
    """Load an `fsdp_dtensor` checkpoint into the model, optimizer and scheduler (all ranks); `rng` and `layout`
    as for `training_state` (the template). Returns (iteration, consumed samples, this rank's saved RNG states,
    or None under another data-parallel size: the ranks' RNG streams do not map onto the new ranks). DCP
    reshards the model's and Adam's DTensors when the data-parallel size differs; any other layout change
    raises ValueError (`layout_change`), a checkpoint DCP cannot read raises ReadError.

    Loading in place, as Megatron-LM's fsdp_dtensor load does (training/checkpointing.py: one DCP load of the
    model's and the optimizer's state dicts into the live DTensors, then the model's and the optimizer's
    load_state_dict): the model's DTensors are views of Megatron-FSDP's sharded buffers and Adam's moments are
    keyed to them, so a load into fresh tensors would hold a second copy of the sharded state (what ZeRO-3 saves)
    and then copy it in. The cost is that a load failing half-way leaves some tensors overwritten. That is
    harmless here: the manifest's digests are checked before any tensor is read (runtime/checkpoint.py
    `resume`), and a load that still fails (a file changed after its manifest) makes `resume` load an older
    checkpoint, which writes every tensor of the same template (model, Adam's moments and steps, param groups,
    scheduler) again, or stop with CheckpointError when none loads; training never starts from a half-loaded
    state (tests/runtime/test_train_fsdp.py resumes bit for bit past such a checkpoint)."""
    reason = layout_change(saved_layout, layout)
    if reason is not None:
        raise ValueError(reason)
    template = training_state(chunks=chunks, optimizer=optimizer, scheduler=scheduler, iteration=0,
                              consumed_samples=0, rng=rng, layout=layout, is_loading=True)
    template.pop(MARKER)
    template.pop(DTYPE_KEY)
    same = saved_layout == layout
    if not same:
        template.pop(_rng_key())
    _dcp_load(template, checkpoint_id=path)  # in place: see "Loading in place" below
    chunks[0].load_state_dict(template[MODEL_KEY])
    if optimizer is not None:
        optimizer.load_state_dict(template["optimizer"])
    common = template["common"]
    if scheduler is not None and common.get("opt_param_scheduler"):
        scheduler.load_state_dict(common["opt_param_scheduler"])
    return int(common["iteration"]), int(common["consumed_samples"]), template[_rng_key()] if same else None


def load_model(path: str, *, chunks) -> None:
    """The model of an fsdp_dtensor checkpoint into a Megatron-FSDP chunk (all ranks; a megatron_fsdp stage's
    `init_checkpoint`): the model part of `load`, without optimizer, scheduler or RNG. DCP assembles each
    rank's DTensor shards from whatever shards were saved, so the saving stage's data-parallel size may differ."""
    from megatron.core.distributed.fsdp.src.megatron_fsdp.uneven_dtensor import (
        preprocess_state_dict_for_uneven_dtensor,
    )

    template = {MODEL_KEY: chunks[0].state_dict()}
    preprocess_state_dict_for_uneven_dtensor(template)
    _dcp_load(template, checkpoint_id=path)
    chunks[0].load_state_dict(template[MODEL_KEY])


def load_full_into_fsdp(chunks, get, *, where: str) -> None:
    """Full (TP=1) Megatron-Core tensors by GPTModel name (`get(name)`, KeyError when absent: a torch_dist
    checkpoint's `DistCheckpointReader`, a converted Hugging Face checkpoint's `SafetensorsReader`) into a
    Megatron-FSDP chunk: each rank copies its shard of each parameter, the range of the flattened parameter
    Megatron-FSDP gives it (`megatron_fsdp_slice`, what Megatron-Core's fsdp_dtensor_checkpoint.py slices
    SwiGLU by), into the parameter's local tensor (the main weights), then Megatron-FSDP installs them in its
    model-weight buffers (`copy_main_weights_to_model_weights`, as after an optimizer step). Tensor and
    expert parallelism are refused (ValueError): their shards are ranges of the rank's TP/EP slice."""
    from megatron.core import parallel_state as ps

    from nemoc.runtime.hf import mapping
    from nemoc.runtime.model import unwrap

    sizes = {"tensor": ps.get_tensor_model_parallel_world_size(), "expert": ps.get_expert_model_parallel_world_size(),
             "expert_tensor": ps.get_expert_tensor_parallel_world_size()}
    if any(v != 1 for v in sizes.values()):
        said = ", ".join(f"{k} = {v}" for k, v in sizes.items() if v != 1)
        raise ValueError(f"{where}: loading full weights into a Megatron-FSDP stage with {said} is not supported "
                         "(nemoc slices them into FSDP shards at tensor = 1 and expert = 1); start this stage "
                         "from an fsdp_dtensor checkpoint of the same tensor size, or with megatron_fsdp = false")
    fsdp = chunks[0]
    padded = int(unwrap(fsdp).vocab_size)
    shards = []
    for name, param in fsdp.param_and_grad_buffer.optimizer_named_parameters:
        gpt_name = name
        while gpt_name.startswith("module."):
            gpt_name = gpt_name[len("module."):]
        flat_range = getattr(param, "megatron_fsdp_slice", None)
        if flat_range is None:
            raise ValueError(f"{where}: Megatron-FSDP keeps no shard range for {gpt_name} (no model-weight "
                             "buffer); start this stage with megatron_fsdp = false")
        full = _get_either_spec(get, gpt_name, where=where)
        if gpt_name.endswith(("word_embeddings.weight", "output_layer.weight")):
            try:
                full = mapping.fit_vocab(full, padded)
            except mapping.MappingError as exc:
                raise ValueError(f"{where}: {gpt_name}: {exc}") from None
        global_shape = tuple(getattr(param, "shape", ()))
        if tuple(full.shape) != global_shape:
            raise ValueError(f"{where}: {gpt_name} has shape {tuple(full.shape)}, the model expects {global_shape} "
                             "(was it trained with this stage's model block?)")
        # a copy of this rank's range only, so the full tensor is freed: the host holds the rank's shards
        shards.append((param, full.reshape(-1)[flat_range].clone()))
    with torch.no_grad():  # every shape checked before the first copy
        for param, shard in shards:
            local = param.to_local() if hasattr(param, "to_local") else param.data
            local.view(-1).copy_(shard)
    fsdp.param_and_grad_buffer.copy_main_weights_to_model_weights()


def _get_either_spec(get, name: str, *, where: str):
    """`get(name)`, or the tensor under the other layer spec's pre-norm name (a converted Hugging Face directory
    or a local-spec checkpoint stores `input_layernorm.weight` where a TE-spec chunk has the fused
    `linear_qkv.layer_norm_weight`, and the reverse); ValueError naming `where` when neither is there."""
    from nemoc.runtime.hf.mapping import either_spec

    try:
        return either_spec(get)(name)
    except KeyError:
        pass
    raise ValueError(f"{where}: it has no tensor {name} (was it trained with this stage's model block?)")


class FullCheckpointError(ValueError):
    """An fsdp_dtensor checkpoint nemoc cannot read as full tensors (the message names it and what to do)."""


def _gpt_name(key: str) -> str | None:
    """The GPTModel state-dict name of a saved model key: `model.` then Megatron-FSDP's wrapper prefixes
    (`module.`: FullyShardedDataParallel's module; a second one for a Float16Module) dropped. GPTModel has no
    child named `module`, so every leading `module.` is a wrapper's."""
    if not key.startswith(MODEL_KEY + "."):
        return None
    name = key[len(MODEL_KEY) + 1:]
    while name.startswith("module."):
        name = name[len("module."):]
    return name


class FullTensorReader:
    """`get(name)` of the full (unsharded) model tensors of an fsdp_dtensor checkpoint by GPTModel state-dict
    name (`decoder.layers.3.mlp.linear_fc1.weight`; KeyError for a name it lacks), `names()`, `dtype()`.

    A decoder layer's tensors are read together on first access (one `dcp.load` into plain tensors of the
    saved global shapes: DCP assembles the DTensor shards, however many ranks wrote them) and dropped when
    another layer is asked for, so the host holds one layer plus the tensor being used. Checkpoints saved
    with tensor or expert parallelism are refused (FullCheckpointError): nemoc's FSDP save keeps SwiGLU's
    fc1 and the experts in their per-rank layout there (Megatron-LM splits them first:
    transformer/fsdp_dtensor_checkpoint.py `handle_swiglu_in_state_dict`, `handle_experts_in_state_dict`)."""

    def __init__(self, path: str, *, layout: dict | None = None, training_dtype: str | None = None):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = str(path)
        self._training_dtype = training_dtype
        names = dict(tp="tensor", ep="expert", etp="expert_tensor")
        bad = {k: v for k, v in (layout or {}).items() if k in names and v not in (None, 1)}
        if bad:
            said = ", ".join(f"{names[k]} = {v}" for k, v in sorted(bad.items()))
            raise FullCheckpointError(
                f"{self.path}: this fsdp_dtensor checkpoint was saved by a Megatron-FSDP stage with {said}; nemoc "
                "reads FSDP checkpoints as full tensors (for a later stage or an export) only from stages with "
                "tensor = 1, expert = 1 and expert tensor = 1 (their SwiGLU and expert weights are stored per "
                "rank). Retrain that stage with those sizes, or resume it under the layout that saved it")
        try:
            meta = FileSystemReader(self.path).read_metadata()
        except Exception as exc:  # noqa: BLE001 -- a damaged .metadata raises whatever unpickling it hits
            raise FullCheckpointError(f"{self.path}: not a readable fsdp_dtensor checkpoint (its .metadata: "
                                      f"{type(exc).__name__}: {exc}); train that stage again, or point at an "
                                      "intact checkpoint") from None
        self.meta = {}
        for key, md in meta.state_dict_metadata.items():
            name = _gpt_name(key)
            if name is not None and isinstance(md, TensorStorageMetadata):
                self.meta[name] = (key, md)
        if not self.meta:
            raise FullCheckpointError(f"{self.path}: the fsdp_dtensor checkpoint holds no model tensors")
        self._layer: str | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self.loads = 0  # dcp.load calls (one per decoder layer + one per other tensor)

    def names(self) -> list[str]:
        return sorted(self.meta)

    def dtype(self) -> torch.dtype:
        name = "embedding.word_embeddings.weight"
        return (self.meta[name] if name in self.meta else next(iter(self.meta.values())))[1].properties.dtype

    def training_dtype(self) -> torch.dtype:
        """The dtype the saving stage trained in (its manifest's `dtype`: bf16 for a bf16 stage, whose checkpoint
        stores the fp32 main weights); the stored dtype for a checkpoint saved before nemoc recorded it."""
        named = getattr(torch, self._training_dtype, None) if self._training_dtype else None
        return named if isinstance(named, torch.dtype) else self.dtype()

    def _load(self, names: list[str]) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint import FileSystemReader

        out = {n: torch.empty(tuple(self.meta[n][1].size), dtype=self.meta[n][1].properties.dtype) for n in names}
        self.loads += 1
        try:
            with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
                warnings.simplefilter("ignore", UserWarning)
                _dcp_load({self.meta[n][0]: t for n, t in out.items()}, storage_reader=FileSystemReader(self.path),
                          no_dist=True)
        except ReadError as exc:
            raise FullCheckpointError(f"{self.path}: {exc}") from None
        return out

    def get(self, name: str) -> torch.Tensor:
        if name not in self.meta:
            raise KeyError(name)
        m = _LAYER.match(name)
        if m is None:
            return self._load([name])[name]
        if self._layer != m.group(1):
            self._cache = {}  # drop the previous layer before reading the next
            self._layer = m.group(1)
            prefix = f"decoder.layers.{self._layer}."
            self._cache = self._load([n for n in self.meta if n.startswith(prefix)])
        return self._cache[name]


def saved_manifest(path: str) -> dict:
    """The nemoc manifest of a finished checkpoint directory (runtime/checkpoint.py MANIFEST), {} if unreadable."""
    import json

    try:
        with open(os.path.join(path, "nemoc_checkpoint.json"), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def is_fsdp_checkpoint(path: str) -> bool:
    return saved_manifest(str(path)).get("format") == FORMAT


def full_reader(path: str) -> FullTensorReader:
    """The `FullTensorReader` of a finished fsdp_dtensor checkpoint directory (its manifest gives the layout)."""
    manifest = saved_manifest(str(path))
    return FullTensorReader(str(path), layout=manifest.get("layout", {}), training_dtype=manifest.get("dtype"))
