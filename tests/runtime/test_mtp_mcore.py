"""Multi-token prediction against Megatron-Core 0.16.1 on the CPU: the GPTModel the runtime builds
(`model.build_model_chunks` with `megatron_args.transformer_config` and the plan's MTP depth, `mtp_kwargs`) has
the parameter names and count of the GPTModel Megatron-Core builds itself from the same TransformerConfig
(gpt_layer_specs.py `get_gpt_decoder_block_spec` + `get_gpt_mtp_block_spec`), which `flops.param_counts` states
as the main model plus `mtp`; with the same seed, on a batch whose last positions are masked (a short final
sample's pad), the runtime's forward step and loss function compute what Megatron-LM's pretrain_gpt.py computes
with the bare model: the same main loss, the same MTP loss (Megatron's MTPLossLoggingHelper tracker, what the
runtime logs as "mtp_1 loss"; masked by the batch's loss mask) and the same gradients (the MTP loss enters the
backward through MTPLossAutoScaler).

Run in a subprocess: building Megatron models needs the CPU adaptation and a process group, which must not
leak into the pytest process.
"""

from __future__ import annotations

import textwrap

import pytest

from nemoc.compiler.flops import param_counts
from nemoc.compiler.spec import ModelSpec

from mcore_models_script import run_models_script

# a MoE model with a dense first layer (DeepSeek's first_k_dense_replace): the MTP layer is an expert layer, the
# last layer's kind; and a dense model whose MTP layer is a dense one
MODELS = {
    "moe": ModelSpec(name="t", layers=3, hidden=32, heads=4, query_groups=2, ffn_hidden=96, vocab=128, seq_length=16,
                     experts=4, top_k=2, moe_ffn_hidden=24, shared_expert_ffn_hidden=40, moe_first_dense_layers=1,
                     mtp_num_layers=1, mtp_loss_scaling_factor=0.3),
    "dense_two_depths": ModelSpec(name="d", layers=2, hidden=32, heads=4, query_groups=4, ffn_hidden=64, vocab=128,
                                  seq_length=16, mtp_num_layers=2),
}

SCRIPT = textwrap.dedent('''
    import dataclasses, json, sys, types, torch
    from nemoc.runtime import mcore_cpu
    mcore_cpu.apply()
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
    from nemoc.compiler.plan import Layout
    from nemoc.compiler.spec import ModelSpec
    from nemoc.runtime import megatron_args as margs, model as mdl, train

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    facts = margs.MachineFacts(cpu=True, have_te=False)
    layout = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=1, global_batch=1, num_microbatches=1,
                    sequence_parallel=False, distributed_optimizer=False, recompute="none")

    def batch_of(spec):
        """Two samples, the second ending in 5 positions GPTDataset masks (a short final sample's pad: label 0,
        loss mask 0)."""
        torch.manual_seed(7)
        tokens = torch.randint(1, spec.vocab, (2, spec.seq_length))
        labels, mask = tokens.clone(), torch.ones(2, spec.seq_length)
        labels[1, -5:], mask[1, -5:] = 0, 0.0
        return dict(tokens=tokens, labels=labels, loss_mask=mask,
                    position_ids=torch.arange(spec.seq_length)[None].expand(2, -1))

    def grad_norm(model):
        return float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None)))

    def run_ours(model, spec):
        """The runtime's forward step and loss function (what the training loop calls)."""
        MTPLossLoggingHelper.tracker.clear()
        output, loss_func = train.gpt_forward_step(iter([batch_of(spec)]), model)
        total, tokens, report = loss_func(output)
        (total / tokens).backward()
        mtp = {k: float(v) for k, v in report.items() if k.startswith("mtp_")}
        return float(total / tokens), mtp, grad_norm(model)

    def run_theirs(model, spec, masked=True):
        """Megatron-LM pretrain_gpt.py: forward_step passes the loss mask to the model, loss_func masks the main loss."""
        b = batch_of(spec)
        MTPLossLoggingHelper.tracker.clear()
        output = model(b["tokens"], b["position_ids"], None, labels=b["labels"],
                       loss_mask=b["loss_mask"] if masked else None)
        loss = (output.float() * b["loss_mask"]).sum() / b["loss_mask"].sum()
        mtp = {k: float(v) for k, v in train.mtp_reports(spec.mtp_num_layers).items()}
        if not masked:
            return mtp
        loss.backward()
        return float(loss), mtp, grad_norm(model)

    out = {}
    for name, fields in json.loads(sys.argv[1]).items():
        spec = ModelSpec(**fields)
        cfg = margs.transformer_config(model=spec, layout=layout, precision="fp32", attention_backend="unfused",
                                       facts=facts)
        no_mtp = cfg.mtp_num_layers
        execution = types.SimpleNamespace(mtp_num_layers=spec.mtp_num_layers)  # the plan's Execution field
        cfg = dataclasses.replace(cfg, **margs.mtp_kwargs(spec, execution))
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        torch.manual_seed(1)
        (ours,) = mdl.build_model_chunks(config=cfg, model=spec, vocab_size=spec.vocab, seq_length=spec.seq_length,
                                         attention_backend="unfused", have_te=False)
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        torch.manual_seed(1)
        block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
        theirs = GPTModel(config=cfg, transformer_layer_spec=block, vocab_size=spec.vocab,
                          max_sequence_length=spec.seq_length, position_embedding_type="rope",
                          mtp_block_spec=get_gpt_mtp_block_spec(cfg, block, use_transformer_engine=False))
        names = lambda m: sorted((n, tuple(p.shape)) for n, p in m.named_parameters())
        out[name] = dict(no_mtp=no_mtp, config=[cfg.mtp_num_layers, cfg.mtp_loss_scaling_factor],
                         names_equal=names(ours) == names(theirs),
                         mtp_names=[n for n, _ in names(ours) if n.startswith("mtp.")],
                         ours=sum(p.numel() for p in ours.parameters()),
                         mtp=sum(p.numel() for n, p in ours.named_parameters() if n.startswith("mtp.")),
                         theirs=sum(p.numel() for p in theirs.parameters()),
                         run_ours=run_ours(ours, spec), run_theirs=run_theirs(theirs, spec),
                         unmasked_mtp=run_theirs(theirs, spec, masked=False))
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def measured():
    return run_models_script(SCRIPT, MODELS)


@pytest.mark.slow  # one Megatron subprocess, ~20 s
def test_parameters_equal_megatron_cores_mtp_model(measured):
    for name, model in MODELS.items():
        m = measured[name]
        counts = param_counts(model)
        assert m["names_equal"], name
        assert m["ours"] == m["theirs"] == counts.total_with_mtp, (name, m["ours"], m["theirs"], counts)
        assert m["mtp"] == counts.mtp > 0, (name, m["mtp"], counts.mtp)
        assert m["no_mtp"] is None and m["config"] == [model.mtp_num_layers, model.mtp_loss_scaling_factor]
    # every depth: enorm, hnorm, eh_proj, its layer, a final norm (the MoE model's layer has experts and a router)
    moe = measured["moe"]["mtp_names"]
    for part in ("mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
                 "mtp.layers.0.final_layernorm.weight", "mtp.layers.0.transformer_layer.mlp.router.weight"):
        assert part in moe, (part, moe)
    assert any(n.startswith("mtp.layers.1.") for n in measured["dense_two_depths"]["mtp_names"])


@pytest.mark.slow
def test_losses_and_gradients_equal_megatron_cores(measured):
    """The same seed gives the same weights; the runtime's forward step and loss function on a batch with masked
    positions give Megatron-LM's main loss, per-depth MTP losses (from Megatron's tracker, as the runtime reports
    them; masked as pretrain_gpt.py masks them) and gradient norm (main loss + 0.3 x MTP loss in backward)."""
    for name, model in MODELS.items():
        ours, theirs = measured[name]["run_ours"], measured[name]["run_theirs"]
        assert ours[0] == pytest.approx(theirs[0], rel=1e-6), name
        assert sorted(ours[1]) == [f"mtp_{i + 1} loss" for i in range(model.mtp_num_layers)]
        for key, value in ours[1].items():
            assert value > 0 and value == pytest.approx(theirs[1][key], rel=1e-6), (name, key)
        assert ours[2] == pytest.approx(theirs[2], rel=1e-6), name
        # the batch's masked positions change the MTP loss: a forward that drops the mask would not match
        unmasked = measured[name]["unmasked_mtp"]
        assert all(abs(unmasked[k] - ours[1][k]) > 1e-4 * ours[1][k] for k in ours[1]), (name, unmasked, ours[1])
