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


def _manifest(directory, layout=LAYOUT, **fields):
    (directory / "nemoc_checkpoint.json").write_text(json.dumps({"format": "fsdp_dtensor", "layout": layout,
                                                                 "files": {}, "iteration": 1, **fields}))


def _save_like_fsdp(model, directory, prefix="model.module.", rename=None, **manifest):
    """The model's tensors under Megatron-FSDP's key names, as one process's DCP save (whole tensors);
    `rename(name, tensor) -> (name, tensor)` changes them first (another layer spec's names, other rows)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from nemoc.runtime.model import unwrap

    state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items() if torch.is_tensor(v)}
    if rename is not None:
        state = dict(rename(k, v) for k, v in state.items())
    state = {prefix + k: v for k, v in state.items()}
    dcp.save(state, storage_writer=FileSystemWriter(str(directory)), no_dist=True)
    _manifest(directory, **manifest)
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
                                                                   r"tensor = 1, expert = 1 and expert tensor = 1"
                       ) as info:
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

    now = dict(LAYOUT, etp=1)  # what layout_key() says today
    assert fsdp_checkpoint.layout_change(LAYOUT, dict(now, dp=4, world=4)) is None
    why = fsdp_checkpoint.layout_change(LAYOUT, dict(now, tp=2, world=4))
    assert "(tp 1 -> 2)" in why and "the data-parallel size may change" in why and "init_checkpoint" in why
    assert fsdp_checkpoint.layout_change(LAYOUT, now) is None  # saved before etp was recorded: Megatron's default
    assert "(etp 2 -> 1, tp 2 -> 1)" in fsdp_checkpoint.layout_change(dict(LAYOUT, tp=2), now)
    assert "(etp 1 -> 2)" in fsdp_checkpoint.layout_change(dict(LAYOUT, etp=1), dict(LAYOUT, etp=2))


def test_the_layout_key_names_the_expert_tensor_size_and_old_manifests_read_as_megatrons_default(mcore):
    from nemoc.runtime import checkpoint as ckpt

    assert ckpt.layout_key()["etp"] == 1
    assert ckpt.saved_layout({"layout": dict(LAYOUT, tp=2)})["etp"] == 2  # Megatron's default etp is tp
    assert ckpt.saved_layout({"layout": dict(LAYOUT, etp=4)})["etp"] == 4


# ------------------------------------------------------------------ TE's fused norm names, both directions


_TE = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
       ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))


def _as_te(name, tensor):
    for local, fused in _TE:
        name = name.replace(local, fused)
    return name, tensor


def test_an_fsdp_checkpoint_saved_under_te_names_loads_into_a_local_spec_chunk(mcore, tmp_path):
    """An FSDP stage built with TE's spec saves its pre-norms as `linear_qkv.layer_norm_weight` /
    `linear_fc1.layer_norm_weight`; an eval stage (local spec) reads them as input_layernorm / pre_mlp_layernorm."""
    from nemoc.runtime.model import unwrap

    spec = llama_spec()
    torch.manual_seed(0)
    saved = mcore.build_gpt(spec, mcore.single_layout())
    with torch.no_grad():
        for name, p in saved.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    state = _save_like_fsdp(saved, tmp_path / "ck", rename=_as_te)
    assert "model.module.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in state
    model = mcore.build_gpt(spec, mcore.single_layout())
    mcore.load_model(model, tmp_path / "ck")
    theirs = dict(unwrap(saved).named_parameters())
    for name, p in unwrap(model).named_parameters():
        assert torch.equal(p, theirs[name]), name


class _FakeBuffer:
    def __init__(self, params):
        self.optimizer_named_parameters = params
        self.installed = False

    def copy_main_weights_to_model_weights(self):
        self.installed = True


class _FakeShard:
    """A DTensor parameter as far as `load_full_into_fsdp` reads it: its global shape, this rank's local tensor
    (the first half of the flattened parameter) and that range (`megatron_fsdp_slice`)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)
        self.megatron_fsdp_slice = slice(0, self.shape.numel() // 2)
        self.local = torch.zeros(self.shape.numel() // 2)

    def to_local(self):
        return self.local

    def __getitem__(self, index):
        return self.local[index]


class _FakeFsdp:
    """What `load_full_into_fsdp` reads of a Megatron-FSDP chunk: the named main parameters, each with the range
    of its flattened tensor this rank holds (`megatron_fsdp_slice`), and the padded vocabulary."""

    def __init__(self, shapes: dict, vocab_size: int = 128):
        params = [(name, _FakeShard(shape)) for name, shape in shapes.items()]
        self.param_and_grad_buffer = _FakeBuffer(params)
        self.vocab_size = vocab_size


def test_full_weights_under_local_names_load_into_an_fsdp_chunk_built_with_te(mcore):
    """A converted Hugging Face directory (and a local-spec torch_dist checkpoint) stores input_layernorm.weight;
    a TE-spec FSDP chunk names that parameter linear_qkv.layer_norm_weight: found under either name."""
    from nemoc.runtime import fsdp_checkpoint

    full = {"decoder.layers.0.input_layernorm.weight": torch.arange(8.0),
            "decoder.layers.0.pre_mlp_layernorm.weight": torch.arange(8.0) + 10,
            "decoder.layers.0.mlp.linear_fc1.weight": torch.arange(16.0).reshape(2, 8)}
    fsdp = _FakeFsdp({"module.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": (8,),
                      "module.decoder.layers.0.mlp.linear_fc1.layer_norm_weight": (8,),
                      "module.decoder.layers.0.mlp.linear_fc1.weight": (2, 8)})
    fsdp_checkpoint.load_full_into_fsdp([fsdp], full.__getitem__, where="/ck")
    got = dict(fsdp.param_and_grad_buffer.optimizer_named_parameters)
    qkv_norm = got["module.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]
    assert torch.equal(qkv_norm[:4], torch.arange(4.0))
    assert torch.equal(got["module.decoder.layers.0.mlp.linear_fc1.layer_norm_weight"][:4], torch.arange(4.0) + 10)
    assert fsdp.param_and_grad_buffer.installed
    # and the reverse: fused names in the source, a local-spec chunk
    fused = {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": torch.arange(8.0)}
    local = _FakeFsdp({"module.decoder.layers.0.input_layernorm.weight": (8,)})
    fsdp_checkpoint.load_full_into_fsdp([local], fused.__getitem__, where="/ck")
    assert torch.equal(local.param_and_grad_buffer.optimizer_named_parameters[0][1][:4], torch.arange(4.0))
    missing = _FakeFsdp({"module.decoder.layers.0.self_attention.linear_proj.weight": (8,)})
    with pytest.raises(ValueError, match=r"^/ck: it has no tensor decoder.layers.0.self_attention.linear_proj.weight"):
        fsdp_checkpoint.load_full_into_fsdp([missing], fused.__getitem__, where="/ck")


# ------------------------------------------------------------------ vocabulary rows are never cut silently


def test_real_vocabulary_rows_past_the_models_are_refused_padding_rows_are_dropped(mcore, tmp_path):
    from nemoc.runtime import checkpoint as ckpt
    from nemoc.runtime import fsdp_checkpoint
    from nemoc.runtime.hf import mapping
    from nemoc.runtime.model import unwrap

    padded = torch.randn(130, 4)
    padded[128:] = 0
    assert torch.equal(mapping.fit_vocab(padded, 128), padded[:128])  # another TP size's zero padding
    with pytest.raises(mapping.MappingError, match=r"it has 130 vocabulary rows, of which rows 128..128 are not "
                                                   r"padding .* built for 128 rows .* larger tokenizer; use that "
                                                   r"tokenizer \(at least 129 tokens\)"):
        mapping.fit_vocab(torch.cat([padded[:128], torch.ones(1, 4), torch.zeros(1, 4)]), 128)

    spec = llama_spec()
    model = mcore.build_gpt(spec, mcore.single_layout())
    rows = int(unwrap(model).vocab_size)
    emb = "embedding.word_embeddings.weight"

    def bigger(real: bool):
        def rename(name, t):
            if name in (emb, "output_layer.weight"):
                extra = torch.ones(128, t.shape[1]) if real else torch.zeros(128, t.shape[1])
                t = torch.cat([t, extra])
            return name, t
        return rename

    _save_like_fsdp(model, tmp_path / "pad", rename=bigger(False))
    ckpt.load_full_weights(str(tmp_path / "pad"), chunks=[mcore.build_gpt(spec, mcore.single_layout())])
    _save_like_fsdp(model, tmp_path / "big", rename=bigger(True))
    target = mcore.build_gpt(spec, mcore.single_layout())
    before = {k: v.clone() for k, v in unwrap(target).state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ckpt.CheckpointError, match=rf"big: {emb}|big: it has {rows + 128} vocabulary rows"):
        ckpt.load_full_weights(str(tmp_path / "big"), chunks=[target])
    for k, v in unwrap(target).state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k]), k  # refused before any copy

    fsdp = _FakeFsdp({"module." + emb: (rows, 4)}, vocab_size=rows)
    full = {emb: torch.ones(rows + 128, 4)}
    with pytest.raises(ValueError, match=rf"/ck: {emb}: it has {rows + 128} vocabulary rows, of which rows "
                                         rf"{rows}..{rows + 127} are not padding"):
        fsdp_checkpoint.load_full_into_fsdp([fsdp], full.__getitem__, where="/ck")
    assert not fsdp.param_and_grad_buffer.installed


# ------------------------------------------------------------------ an FSDP init_checkpoint that cannot load


def test_an_fsdp_init_checkpoint_of_another_layout_or_unreadable_is_one_checkpoint_error(mcore, tmp_path,
                                                                                            monkeypatch):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from nemoc.runtime import checkpoint as ckpt

    monkeypatch.setattr(ckpt, "_is_fsdp", lambda chunks: True)  # a Megatron-FSDP stage's chunk, as far as it asks
    chunk = torch.nn.Linear(4, 4)
    dcp.save({"model.weight": torch.ones(4, 4)}, storage_writer=FileSystemWriter(str(tmp_path / "tp2")),
             no_dist=True)
    _manifest(tmp_path / "tp2", dict(ckpt.layout_key(), tp=2, world=2))
    with pytest.raises(ckpt.CheckpointError, match=r"tp2: it was saved by Megatron-FSDP .*\(tp 2 -> 1\): a "
                                                   r"Megatron-FSDP stage starts from an fsdp_dtensor checkpoint only "
                                                   r"under .* megatron_fsdp = false"):
        ckpt.load_weights(str(tmp_path / "tp2"), chunks=[chunk])
    dcp.save({"model.other": torch.ones(4, 4)}, storage_writer=FileSystemWriter(str(tmp_path / "other")),
             no_dist=True)
    _manifest(tmp_path / "other", ckpt.layout_key())
    files = sorted(p.name for p in (tmp_path / "other").iterdir())
    with pytest.raises(ckpt.CheckpointError, match=r"other is unusable: torch.distributed.checkpoint could not read "
                                                   r"it .*\(repair it, or start this stage from another checkpoint\)"):
        ckpt.load_weights(str(tmp_path / "other"), chunks=[chunk])
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == files


# ------------------------------------------------------------------ export: damaged metadata, the training dtype


def test_a_corrupt_metadata_file_is_one_export_error_naming_the_checkpoint(tmp_path):
    from nemoc.runtime.hf import trained

    dcp_dir = tmp_path / "ck"
    dcp_dir.mkdir()
    (dcp_dir / ".metadata").write_bytes(b"abc")
    _manifest(dcp_dir)
    with pytest.raises(trained.TrainedExportError, match=r"ck: not a readable fsdp_dtensor checkpoint \(its "
                                                         r"\.metadata: .*\); train that stage again") as info:
        trained.checkpoint_reader(dcp_dir)
    assert "\n" not in str(info.value)


def test_an_fsdp_checkpoint_of_a_bf16_stage_exports_in_bf16_unless_told_otherwise(mcore, tmp_path):
    from safetensors import safe_open

    from nemoc.runtime.hf import trained

    spec = llama_spec()
    model = mcore.build_gpt(spec, mcore.single_layout())
    _save_like_fsdp(model, tmp_path / "ck", dtype="bfloat16")  # fp32 main weights, trained in bf16

    def written(out):
        dtypes = set()
        for f in out.glob("*.safetensors"):
            with safe_open(f, "pt") as handle:
                dtypes |= {handle.get_tensor(k).dtype for k in handle.keys()}
        return dtypes, json.loads((out / "config.json").read_text())["dtype"]

    out, manifest = trained.export_trained(tmp_path / "ck", spec, tmp_path / "hf", vocab=spec.vocab, source=None,
                                           tokenizer_dir=None)
    assert manifest["dtype"] == "bfloat16" and written(out) == ({torch.bfloat16}, "bfloat16")
    out, _ = trained.export_trained(tmp_path / "ck", spec, tmp_path / "hf32", vocab=spec.vocab, source=None,
                                    tokenizer_dir=None, dtype="float32")
    assert written(out) == ({torch.float32}, "float32")
    _manifest(tmp_path / "ck")  # saved before the manifest named the training dtype: the stored one
    out, _ = trained.export_trained(tmp_path / "ck", spec, tmp_path / "old", vocab=spec.vocab, source=None,
                                    tokenizer_dir=None)
    assert written(out) == ({torch.float32}, "float32")


def test_the_training_dtype_is_the_chunks_precision(mcore):
    from nemoc.runtime import fsdp_checkpoint

    spec = llama_spec()
    assert fsdp_checkpoint.training_dtype(mcore.build_gpt(spec, mcore.single_layout())) == "float32"
    assert fsdp_checkpoint.training_dtype(mcore.build_gpt(spec, mcore.single_layout(), precision="bf16")) == "bfloat16"


def test_the_runtime_wraps_every_training_kind_in_fsdp_where_planned():
    """Every alignment kind that trains wraps its trained models in Megatron-FSDP where the plan says so (kto's KL
    baseline, ppo's and grpo's rollouts and experience passes through the wrapper: runtime/align/runners.py);
    the planner keeps megatron_fsdp for them (compiler/planner.py drops it where the caps say no)."""
    from nemoc.runtime.target import NEMOC_RUNTIME

    assert all(NEMOC_RUNTIME.caps(k).megatron_fsdp for k in ("sft", "dpo", "orpo", "reward", "kto", "ppo", "grpo"))


def test_fsdp_around_a_model_with_frozen_parameters_is_refused(mcore):
    """LoRA's frozen base: the planner plans such stages without FSDP (compiler/planner.py); the trainer refuses
    a plan that says otherwise instead of sharding a model whose bulk takes no gradient."""
    from types import SimpleNamespace

    from nemoc.runtime.align import trainer
    from nemoc.runtime.align.common import AlignError

    with pytest.raises(AlignError, match="frozen parameters"):
        trainer._wrap([], config=None, layout=SimpleNamespace(megatron_fsdp=True), overlaps=None, frozen=True)


def test_a_reward_stages_fsdp_checkpoint_loads_its_scalar_head_whole(mcore, tmp_path):
    """A reward stage trained under Megatron-FSDP feeds ppo (critic and reward model) and eval through its
    fsdp_dtensor checkpoint: the scalar head ([1, h] weight, [1] bias) is taken as it is, not fitted to the
    vocabulary's rows as a language-model head would be (runtime/hf/convert.py `rank_slices`)."""
    from nemoc.runtime.model import unwrap

    spec = llama_spec()
    torch.manual_seed(0)
    saved = mcore.build_gpt(spec, mcore.single_layout(), scalar_head=True)
    with torch.no_grad():
        unwrap(saved).output_layer.weight.normal_()
        unwrap(saved).output_layer.bias.fill_(0.25)
    _save_like_fsdp(saved, tmp_path / "rm")
    torch.manual_seed(1)
    model = mcore.build_gpt(spec, mcore.single_layout(), scalar_head=True)
    mcore.load_model(model, tmp_path / "rm")
    theirs = dict(unwrap(saved).named_parameters())
    for name, p in unwrap(model).named_parameters():
        assert torch.equal(p, theirs[name]), name
    assert unwrap(model).output_layer.weight.shape == (1, spec.hidden)
