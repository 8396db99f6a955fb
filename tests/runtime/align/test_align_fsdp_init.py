"""A Megatron-FSDP stage's fsdp_dtensor checkpoint read as full tensors (runtime/fsdp_checkpoint.py
`FullTensorReader`): the DTensor shards several ranks wrote assembled by torch.distributed.checkpoint, the
names Megatron-FSDP saves (`model.module.` + the GPTModel's state-dict names) mapped back, loaded into an
unsharded model (runtime/hf/load.py `load_full`, the slicing a converted Hugging Face checkpoint takes) and
exported to Hugging Face (runtime/hf/trained.py) with transformers' logits equal to ours. The real chain
(`nemoc run`: pretrain with megatron_fsdp -> sft at tensor = 2 -> export) is tests/runtime/test_train_fsdp.py."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from align_helpers import llama_spec

LAYOUT = dict(tp=1, pp=1, vp=None, cp=1, ep=1, dp=2, world=2)


def _manifest(directory, layout=LAYOUT):
    (directory / "nemoc_checkpoint.json").write_text(json.dumps({"format": "fsdp_dtensor", "layout": layout,
                                                                 "files": {}, "iteration": 1}))


def _save_like_fsdp(model, directory, prefix="model.module."):
    """The model's tensors under Megatron-FSDP's key names, as one process's DCP save (whole tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from nemoc.runtime.model import unwrap

    state = {prefix + k: v.detach().clone() for k, v in unwrap(model).state_dict().items() if torch.is_tensor(v)}
    dcp.save(state, storage_writer=FileSystemWriter(str(directory)), no_dist=True)
    _manifest(directory)
    return state


def _logits(common, model, tokens):
    batch = common.make_batch([(t, [1] * len(t)) for t in tokens.tolist()], tokens.shape[1] - 1)
    model.eval()
    with torch.no_grad():
        return common.gather_logits(model, batch)


# ------------------------------------------------------------------ shards of two ranks, assembled


def _write_sharded(rank: int, port: int, directory: str, full: dict) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        dcp.save({k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}, checkpoint_id=directory)
    finally:
        dist.destroy_process_group()


def test_the_shards_two_ranks_saved_read_back_as_full_tensors_one_layer_at_a_time(tmp_path):
    from nemoc.runtime import fsdp_checkpoint

    torch.manual_seed(0)
    full = {  # uneven rows (5 = 3 + 2), like Megatron-FSDP's uneven DTensors
        "model.module.embedding.word_embeddings.weight": torch.randn(5, 4),
        "model.module.decoder.layers.0.mlp.linear_fc1.weight": torch.randn(6, 4),
        "model.module.decoder.layers.0.input_layernorm.weight": torch.randn(4),
        "model.module.module.decoder.layers.1.mlp.linear_fc1.weight": torch.randn(6, 4),  # a Float16Module inside
        "optimizer.state.module.module.embedding.word_embeddings.weight.exp_avg": torch.randn(5, 4),
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_write_sharded, args=(port, str(tmp_path), full), nprocs=2, start_method="spawn")
    _manifest(tmp_path)
    reader = fsdp_checkpoint.full_reader(str(tmp_path))
    assert reader.names() == ["decoder.layers.0.input_layernorm.weight", "decoder.layers.0.mlp.linear_fc1.weight",
                              "decoder.layers.1.mlp.linear_fc1.weight", "embedding.word_embeddings.weight"]
    for key, tensor in full.items():
        name = fsdp_checkpoint._gpt_name(key)
        if name is not None:
            assert torch.equal(reader.get(name), tensor), name
    assert reader.dtype() == torch.float32
    with pytest.raises(KeyError):
        reader.get("output_layer.weight")
    reader = fsdp_checkpoint.full_reader(str(tmp_path))
    reader.get("decoder.layers.0.mlp.linear_fc1.weight")
    reader.get("decoder.layers.0.input_layernorm.weight")  # same layer: no second read
    reader.get("decoder.layers.1.mlp.linear_fc1.weight")
    assert reader.loads == 2 and set(reader._cache) == {"decoder.layers.1.mlp.linear_fc1.weight"}


def test_a_checkpoint_saved_with_tensor_parallelism_is_refused_with_what_to_do(tmp_path):
    from nemoc.runtime import fsdp_checkpoint

    _manifest(tmp_path, dict(LAYOUT, tp=2))
    with pytest.raises(fsdp_checkpoint.FullCheckpointError, match=r"tensor = 2; nemoc reads FSDP checkpoints .* "
                                                                   r"tensor = 1 and expert = 1") as info:
        fsdp_checkpoint.full_reader(str(tmp_path))
    assert str(tmp_path) in str(info.value)


# ------------------------------------------------------------------ into a model, and out to Hugging Face


def test_an_fsdp_checkpoint_initialises_a_model_and_exports_with_equal_logits(mcore, tmp_path):
    from transformers import AutoModelForCausalLM

    from nemoc.runtime import checkpoint as ckpt
    from nemoc.runtime.hf import trained
    from nemoc.runtime.model import unwrap

    spec = llama_spec()
    torch.manual_seed(0)
    saved = mcore.build_gpt(spec, mcore.single_layout())
    with torch.no_grad():  # norms start at exactly 1: perturb them so a dropped norm shows
        for name, p in saved.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    _save_like_fsdp(saved, tmp_path / "ck")
    torch.manual_seed(1)
    model = mcore.build_gpt(spec, mcore.single_layout())
    emb = "embedding.word_embeddings.weight"
    assert not torch.equal(unwrap(model).state_dict()[emb], unwrap(saved).state_dict()[emb])
    assert mcore.resolve_checkpoint(tmp_path / "ck") == tmp_path / "ck"
    mcore.load_model(model, tmp_path / "ck")  # what a later stage (sft, dpo, eval, ...) does with its parent's
    theirs = dict(unwrap(saved).named_parameters())
    for name, p in unwrap(model).named_parameters():
        assert torch.equal(p, theirs[name]), name
    tokens = torch.randint(0, spec.vocab, (2, 17))
    ours = _logits(mcore, model, tokens)[..., : spec.vocab]
    torch.testing.assert_close(ours, _logits(mcore, saved, tokens)[..., : spec.vocab], atol=0, rtol=0)

    out, _ = trained.export_trained(tmp_path / "ck", spec, tmp_path / "hf", vocab=spec.vocab, source=None,
                                    tokenizer_dir=None)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        exported = hf(tokens[:, :-1]).logits
    torch.testing.assert_close(exported, ours.float(), atol=1e-4, rtol=1e-4)

    other = mcore.build_gpt(llama_spec(ffn_hidden=128), mcore.single_layout())
    with pytest.raises(ckpt.CheckpointError, match=r"linear_fc1.weight has shape \(192, 64\), the model expects "
                                                   r"\(256, 64\) \(was it trained with this stage's model block\?\)"):
        ckpt.load_full_weights(str(tmp_path / "ck"), chunks=[other])


def test_a_shard_cut_short_is_one_error_naming_the_checkpoint_not_a_traceback(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from nemoc.runtime import fsdp_checkpoint

    dcp.save({"model.module.decoder.layers.0.mlp.linear_fc1.weight": torch.randn(64, 64)},
             storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True)
    _manifest(tmp_path)
    shard = next(tmp_path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    reader = fsdp_checkpoint.full_reader(str(tmp_path))
    with pytest.raises(fsdp_checkpoint.FullCheckpointError,
                       match=r"torch.distributed.checkpoint could not read it \(rank 0 of 1 failing\): ") as info:
        reader.get("decoder.layers.0.mlp.linear_fc1.weight")
    assert str(info.value).startswith(str(tmp_path)) and "\n" not in str(info.value)


def test_a_resume_may_change_the_data_parallel_size_only():
    from nemoc.runtime import fsdp_checkpoint

    assert fsdp_checkpoint.layout_change(LAYOUT, dict(LAYOUT, dp=4, world=4)) is None
    why = fsdp_checkpoint.layout_change(LAYOUT, dict(LAYOUT, tp=2, world=4))
    assert "(tp 1 -> 2)" in why and "the data-parallel size may change" in why and "init_checkpoint" in why
