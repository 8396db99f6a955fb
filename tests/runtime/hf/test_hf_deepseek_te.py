"""DeepSeek-V3 on Transformer Engine's layer spec (the default on GPUs): Megatron-Core 0.16.1's
get_gpt_layer_with_transformer_engine_spec(multi_latent_attention=True, qk_layernorm=True) fuses the latent norms
into the up projections (`linear_q_up_proj.layer_norm_weight`, `linear_kv_up_proj.layer_norm_weight`;
q_layernorm = kv_layernorm = IdentityOp), keeps both down projections whole on every TP rank
(TELinear(parallel_mode='duplicated')), fuses a dense layer's pre-MLP norm into linear_fc1 and keeps a MoE
layer's as pre_mlp_layernorm. TE is not built here: the chunk's names and shapes are written out below, and the
import (runtime/hf/load.py) and the export (runtime/hf/mapping.py) are checked against them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_models import make_hf_model, read_tensors

from nemoc.runtime.hf import convert, mapping
from nemoc.runtime.hf.load import _te_names, whole_projections

H, HEADS, QL, KVL, NOPE, PE, V, FFN, MOE_FFN, E = 64, 4, 24, 16, 16, 8, 12, 96, 32, 4  # hf_models deepseek_v3_dense


def te_chunk(tp: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a TP rank's GPTModel built with TE's MLA spec: layer 0 dense, layer 1 MoE (one shared
    expert), vocabulary 200 padded to 128 * tp."""
    out = {"embedding.word_embeddings.weight": (256 // tp, H), "decoder.final_layernorm.weight": (H,),
           "output_layer.weight": (256 // tp, H)}
    for i in (0, 1):
        a = f"decoder.layers.{i}.self_attention"
        out |= {f"decoder.layers.{i}.input_layernorm.weight": (H,),
                f"{a}.linear_q_down_proj.weight": (QL, H),  # duplicated: whole on every rank
                f"{a}.linear_q_up_proj.layer_norm_weight": (QL,),
                f"{a}.linear_q_up_proj.weight": (HEADS * (NOPE + PE) // tp, QL),
                f"{a}.linear_kv_down_proj.weight": (KVL + PE, H),  # duplicated
                f"{a}.linear_kv_up_proj.layer_norm_weight": (KVL,),
                f"{a}.linear_kv_up_proj.weight": (HEADS * (NOPE + V) // tp, KVL),
                f"{a}.linear_proj.weight": (H, HEADS * V // tp)}
    m = "decoder.layers.0.mlp"
    out |= {f"{m}.linear_fc1.layer_norm_weight": (H,), f"{m}.linear_fc1.weight": (2 * FFN // tp, H),
            f"{m}.linear_fc2.weight": (H, FFN // tp)}
    m = "decoder.layers.1.mlp"
    out |= {"decoder.layers.1.pre_mlp_layernorm.weight": (H,), f"{m}.router.weight": (E, H),
            f"{m}.router.expert_bias": (E,), f"{m}.shared_experts.linear_fc1.weight": (2 * MOE_FFN // tp, H),
            f"{m}.shared_experts.linear_fc2.weight": (H, MOE_FFN // tp)}
    for j in range(E):  # expert tensor parallelism 1
        out |= {f"{m}.experts.local_experts.{j}.linear_fc1.weight": (2 * MOE_FFN, H),
                f"{m}.experts.local_experts.{j}.linear_fc2.weight": (H, MOE_FFN)}
    return out


CONFIG = SimpleNamespace(multi_latent_attention=True, tensor_model_parallel_size=2, q_lora_rank=QL, kv_lora_rank=KVL,
                         qk_pos_emb_head_dim=PE)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds_te")
    make_hf_model("deepseek_v3_dense", tmp / "hf")
    convert.import_checkpoint(tmp / "hf", tmp / "conv")
    return tmp


@pytest.mark.parametrize("rank", [0, 1])
def test_a_deepseek_checkpoint_loads_into_te_names_and_shapes_at_tp2(converted, rank):
    ours = te_chunk(2)
    whole = whole_projections(CONFIG, {n: torch.empty(s) for n, s in ours.items()})
    assert whole == mapping.TE_WHOLE
    state = _te_names(convert.rank_state_dict(converted / "conv", tp=2, tp_rank=rank, padded_vocab=256, whole=whole),
                      ours)
    assert set(state) == set(ours)
    assert {n: tuple(t.shape) for n, t in state.items()} == ours
    full = convert.rank_state_dict(converted / "conv", padded_vocab=256)
    for i in (0, 1):  # the latent norms are the local spec's q_layernorm / kv_layernorm, the down projections whole
        a = f"decoder.layers.{i}.self_attention"
        assert torch.equal(state[f"{a}.linear_kv_up_proj.layer_norm_weight"], full[f"{a}.kv_layernorm.weight"])
        assert torch.equal(state[f"{a}.linear_q_up_proj.layer_norm_weight"], full[f"{a}.q_layernorm.weight"])
        assert torch.equal(state[f"{a}.linear_kv_down_proj.weight"], full[f"{a}.linear_kv_down_proj.weight"])


def test_the_local_spec_still_splits_the_down_projections():
    """The local spec's down projections are column-parallel: a chunk holding their TP-split rows keeps the split."""
    local = {"decoder.layers.0.self_attention.linear_q_down_proj.weight": torch.empty(QL // 2, H),
             "decoder.layers.0.self_attention.linear_kv_down_proj.weight": torch.empty((KVL + PE) // 2, H)}
    assert whole_projections(CONFIG, local) == ()
    assert whole_projections(SimpleNamespace(**(CONFIG.__dict__ | {"tensor_model_parallel_size": 1})), local) == ()


def test_a_te_trained_deepseek_checkpoint_exports_under_te_names(converted):
    """A checkpoint saved from TE's spec stores the fused names (and a dense layer's pre-MLP norm in linear_fc1):
    the export reads them and writes the Hugging Face tensors unchanged."""
    arch = convert.read_manifest(converted / "conv")["architecture"]
    te = _te_names(convert.rank_state_dict(converted / "conv", padded_vocab=200), te_chunk(1))
    assert not any("q_layernorm" in n or "kv_layernorm" in n for n in te)

    def get(name):
        return te[name]  # KeyError for a name the TE checkpoint lacks (as the checkpoint readers)

    theirs = read_tensors(converted / "hf")
    out = dict(convert._hf_tensors("deepseek_v3", arch, get))
    assert set(out) == set(theirs) - {n for n in theirs if n.endswith("rotary_emb.inv_freq")}
    assert all(torch.equal(out[n], theirs[n]) for n in out)
