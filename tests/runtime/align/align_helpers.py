"""Tiny model specs and helpers shared by the alignment tests (imported as `align_helpers`)."""

from __future__ import annotations

from nemoc.runtime.taskfile import TASK_JSON_VERSION


# parallel_worker.py's layouts: mode -> (tp, pp, dp, vp, cp, sequence parallel); the world size is the product
PARALLEL_MODES = {"pp2": (1, 2, 1, None, 1, False), "dp2": (1, 1, 2, None, 1, False), "tp2": (2, 1, 1, None, 1, False),
                  "vp2": (1, 2, 1, 2, 1, False), "cp2": (1, 1, 1, None, 2, False),
                  "tp2sp-cp2": (2, 1, 1, None, 2, True), "pp2-cp2": (1, 2, 1, None, 2, False)}


def world_size(mode: str) -> int:
    tp, pp, dp, _, cp, _ = PARALLEL_MODES[mode]
    return tp * pp * dp * cp


def llama_spec(**overrides):
    from nemoc.compiler.spec import ModelSpec

    base = dict(name="tiny-llama", layers=2, hidden=64, heads=4, query_groups=2, ffn_hidden=96, vocab=50,
                seq_length=32, activation="swiglu", norm="rmsnorm", position="rope", rotary_base=10000.0)
    base.update(overrides)
    return ModelSpec(**base)


def mla_spec(**overrides):
    """A tiny DeepSeek-style multi-latent attention model: query and key/value latents with their RMSNorms,
    YaRN RoPE, q/k (16 + 8) and v (12) head widths that differ from each other and from hidden / heads."""
    from nemoc.compiler.spec import ModelSpec

    base = dict(name="tiny-mla", layers=2, hidden=64, heads=4, query_groups=4, ffn_hidden=96, vocab=50,
                seq_length=32, activation="swiglu", norm="rmsnorm", position="rope", multi_latent_attention=True,
                q_lora_rank=24, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12,
                qk_layernorm=True, rope_type="yarn", rope_scaling_factor=4.0, original_max_position_embeddings=8,
                mscale_all_dim=1.0)
    base.update(overrides)
    return ModelSpec(**base)


def gpt2_spec(**overrides):
    from nemoc.compiler.spec import ModelSpec

    base = dict(name="tiny-gpt2", layers=2, hidden=64, heads=4, query_groups=4, ffn_hidden=128, vocab=50,
                seq_length=32, activation="gelu", norm="layernorm", position="learned", add_bias_linear=True,
                tie_embeddings=True)
    base.update(overrides)
    return ModelSpec(**base)


def stage_settings(steps=100, lr=3e-3, **kw):
    """Optimizer/schedule specs for a short CPU run."""
    from nemoc.compiler.spec import OptimizerSpec, ScheduleSpec

    return dict(optimizer=OptimizerSpec(lr=lr, weight_decay=0.0, grad_clip=1.0),
                schedule=ScheduleSpec(name="constant", warmup=0), steps=steps, **kw)


def mla_tp_settings():
    """Three plain SGD steps (no clipping, no Adam normalisation): an adapter gradient that differs between TP
    sizes moves the loss in proportion, where Adam's per-parameter normalisation would hide a constant factor
    and amplify last-bit differences near zero gradients instead."""
    from nemoc.compiler.spec import OptimizerSpec, ScheduleSpec

    return dict(optimizer=OptimizerSpec(name="sgd", lr=0.5, weight_decay=0.0, grad_clip=0.0),
                schedule=ScheduleSpec(name="constant", warmup=0), steps=3)


# A synthetic instruction task over token ids: prompt = [INSTR, a, b, SEP], response = [f(a), f(b), EOD]
# with f a fixed permutation of 16 "letters". A model that ignores the prompt cannot beat the
# response unigram entropy (~ln 16 on two of three tokens); learning the mapping drives it towards 0.
INSTR, SEP, EOD = 1, 2, 3
LETTERS = list(range(10, 26))


def mapping(seed=0):
    import random

    perm = LETTERS[:]
    random.Random(seed).shuffle(perm)
    return dict(zip(LETTERS, perm))


def instruction_samples(n, seed, f):
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(LETTERS), rng.choice(LETTERS)
        ids = [INSTR, a, b, SEP, f[a], f[b], EOD]
        out.append((ids, [0, 0, 0, 0, 1, 1, 1]))
    return out


def preference_pairs(n, seed, f):
    """prompt [INSTR, a, SEP]; chosen [f(a), f(a), EOD]; rejected [g, g, EOD] with g != f(a) random."""
    import random

    from nemoc.runtime.align.dpo import Pair

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.choice(LETTERS)
        g = rng.choice([x for x in LETTERS if x != f[a]])
        out.append(Pair(prompt=[INSTR, a, SEP], chosen=[f[a], f[a], EOD], rejected=[g, g, EOD]))
    return out


def clone_model(mcore, spec, chunk, **kw):
    """A second model with the same weights (e.g. DPO's frozen reference)."""
    other = mcore.build_gpt(spec, mcore.single_layout(), **kw)
    other.load_state_dict(chunk.state_dict())
    for p in other.parameters():
        p.requires_grad_(False)
    return other


def make_plan(model, stages, *, data=(), precision="fp32", checkpoint_every=None, log_every=5):
    """A compiled Plan for hand-written stages: stages = [(name, kind, after, params, peft, steps)]."""
    from nemoc.compiler.plan import Estimate, Layout, MemoryBreakdown, Plan, StagePlan
    from nemoc.compiler.spec import CheckpointSpec, ClusterSpec, OptimizerSpec, ScheduleSpec
    from plan_factory import make_execution, with_executions

    layout = Layout(tp=1, pp=1, vp=None, cp=1, ep=1, etp=1, dp=1, micro_batch=4, global_batch=8, num_microbatches=2,
                    sequence_parallel=False, distributed_optimizer=False, recompute="none")
    memory = MemoryBreakdown(weights=0, gradients=0, optimizer=0, activations=0, other=0, capacity=1)
    estimate = Estimate(step_time_s=0.0, tokens_per_s_per_gpu=0.0, model_tflops_per_gpu=0.0, mfu=0.0, steps=0,
                        wall_time_s=0.0, gpu_hours=0.0, cost_usd=None)
    plans = tuple(StagePlan(name=name, kind=kind, after=tuple(after), data=(), layout=layout, memory=memory,
                            estimate=estimate, seq_length=model.seq_length, steps=steps,
                            optimizer=OptimizerSpec(lr=3e-3, weight_decay=0.0), schedule=ScheduleSpec(name="constant"),
                            checkpoint=CheckpointSpec(every=checkpoint_every), peft=peft, log_every=log_every,
                            params=params, execution=make_execution(model, layout, kind=kind))
                  for name, kind, after, params, peft, steps in stages)
    return with_executions(Plan(experiment="t", model=model, cluster=ClusterSpec(gpu="CPU", gpus_per_node=1),
                                precision=precision, attention_backend="unfused", data=tuple(data), stages=plans,
                                kernels="local"))


def write_task(tmp_path, plan, stage, *, datasets, tokenizer, vocab_size, parents, out=None, max_steps=None):
    """plan.json + task.json as the executor writes them; returns the task path."""
    import json

    from nemoc.compiler.plan import to_json

    (tmp_path / "plan.json").write_text(to_json(plan))
    out = out or tmp_path / "tasks" / stage
    task = {"version": TASK_JSON_VERSION, "plan": str(tmp_path / "plan.json"), "stage": stage, "datasets": datasets,
            "tokenizer": tokenizer, "vocab_size": vocab_size,
            "init_checkpoint": next(iter(parents.values()), None), "parents": parents, "output_dir": str(out),
            "checkpoint_dir": str(out / "checkpoints"), "metrics_path": str(out / "metrics.jsonl"),
            "tensorboard_dir": None, "max_steps": max_steps}
    out.mkdir(parents=True, exist_ok=True)
    (out / "task.json").write_text(json.dumps(task))
    return out / "task.json"


def arithmetic_world(root, mcore, *, seed: int, model=None):
    """A tiny chat world under `root`: chat.jsonl ("What is a plus b?"), a byte-level BPE tokenizer trained
    on it, and a random-init base checkpoint (`root/base`) of `model` (a spec function like `llama_spec`, the
    default). Returns (root, spec, tokenizer, qa pairs)."""
    import json

    from nemoc.runtime.tokenizer import train_byte_level_bpe

    qa = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(6) for b in range(6)]
    chat = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]} for q, r in qa]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chat) + "\n")
    tok = train_byte_level_bpe([q + " " + r for q, r in qa] * 4, 300, root / "tokenizer.json")
    spec = (model or llama_spec)(vocab=tok.vocab_size, seq_length=48)
    mcore.seed_all(seed)
    mcore.save_model(mcore.build_gpt(spec, mcore.single_layout(), vocab=tok.vocab_size, seq_length=48), root / "base")
    return root, spec, tok, qa


def train_kind(common, kind: str, base, layout, *, steps: int = 3, layers: int = 2,
               attention: str = "unfused") -> list[float]:
    """`steps` steps of an alignment kind ("sft", "dpo", "reward", "orpo", "kto") on tiny synthetic data from the
    checkpoint `base`, at `layout` (the caller's process group); the logged loss of every step.
    test_align_parallel.py runs it in one process and under torchrun (parallel_worker.py)."""
    from nemoc.runtime.align import dpo, kto, orpo, reward, sft, trainer

    spec = llama_spec(seq_length=16, vocab=256, layers=layers)
    model = common.build_gpt(spec, layout, scalar_head=kind == "reward", attention_backend=attention)
    common.load_model(model, base, skip_output=kind == "reward")  # zero-initialised scalar head
    from nemoc.compiler.plan import Overlaps

    # what the runtime passes (runners.py: the plan's Execution.overlaps): the DP gradient reduce overlapped
    overlaps = Overlaps(grad_reduce=layout.dp > 1, param_gather=False, p2p=False, tp_comm=False)
    tr = trainer.Trainer(model, layout=layout, overlaps=overlaps, **stage_settings(steps=steps, lr=1e-2))
    mb = layout.micro_batch
    if kind == "sft":
        items = [[s] for s in instruction_samples(16, seed=1, f=mapping(0))]
        to_mb, forward = (lambda share: sft.rows_to_batches(share, 16, mb)), sft.forward
    elif kind == "dpo":
        reference = common.build_gpt(spec, layout, attention_backend=attention)
        common.load_model(reference, base)
        scores = dpo.ReferenceScores(model=reference, loss="dpo")
        items = list(enumerate(preference_pairs(16, 1, mapping(2))))
        to_mb = lambda share: dpo.microbatches(share, seq_length=8, micro_batch=mb, reference=scores, table=None)  # noqa: E731
        forward = dpo.make_forward(beta=0.1, loss="dpo")
    elif kind == "orpo":  # no reference: chosen and rejected rows of a pair in one micro-batch
        items = preference_pairs(16, 1, mapping(2))
        to_mb = lambda share: orpo.microbatches(share, seq_length=8, micro_batch=mb)  # noqa: E731
        forward = orpo.make_forward(beta=0.1)
    elif kind == "kto":  # the pairs unpaired (chosen desirable, rejected not); z0 and reference forward-only
        reference = common.build_gpt(spec, layout, attention_backend=attention)
        common.load_model(reference, base)
        items = [kto.Example(p.prompt, reply, good, i) for i, p in enumerate(preference_pairs(8, 1, mapping(2)))
                 for reply, good in ((p.chosen, True), (p.rejected, False))]
        to_mb = lambda share: kto.microbatches(share, policy=model, reference=kto.Reference(model=reference),  # noqa: E731
                                               seq_length=8, micro_batch=mb)
        forward = kto.make_forward(beta=0.1)
    else:
        items = preference_pairs(16, 1, mapping(3))
        to_mb, forward = (lambda share: reward.pair_microbatches(share, seq_length=8, micro_batch=mb)), reward.forward
    history = trainer.run_steps(tr, items=items, steps=steps, global_batch=layout.global_batch,
                                to_microbatches=to_mb, forward=forward, seq_length=16 if kind == "sft" else 8)
    return [h["loss"] for h in history]


def rl_spec(*, layers: int = 2, experts: int = 0):
    """The model of `rl_kind`: the tiny Llama, or with `experts` a Mixtral-style mixture of experts (top-2
    routing, experts narrower than the dense MLP, as test_align_sft.py's)."""
    moe = dict(experts=experts, top_k=2, moe_ffn_hidden=48) if experts else {}
    return llama_spec(seq_length=16, vocab=256, layers=layers, **moe)


def rl_kind(common, kind: str, base, layout, *, iterations: int = 2, layers: int = 2, experts: int = 0,
            attention: str = "unfused") -> dict:
    """`iterations` iterations of PPO or GRPO at `layout` (the caller's process group) from the checkpoint
    `base`: policy (and critic, reward model) trunks loaded from it, the reward model's scalar head a
    fixed random vector (so scores differ between responses), rollouts with the KV-cached generator.
    `attention`: the attention core (context parallelism needs the SDPA core, `flash`).
    Returns {"tokens": a sampled rollout of the initial policy, "steps": every iteration's metrics}.
    `layers` and `experts` (a Mixtral-style MoE: `rl_spec`) must be those `base` was saved with.
    test_align_rl_pipeline.py runs it in one process and under torchrun (rl_pipeline_worker.py)."""
    import torch

    from nemoc.compiler.plan import Overlaps
    from nemoc.runtime import generation
    from nemoc.runtime.align import grpo, ppo, trainer

    spec = rl_spec(layers=layers, experts=experts)

    def model(*, head: bool = False, frozen: bool = False):
        chunk = common.build_gpt(spec, layout, scalar_head=head, attention_backend=attention)
        common.load_model(chunk, base, skip_output=head)
        # the same vector on every layout (the head lives on the last pipeline stage's last chunk)
        for out in [getattr(common.unwrap(c), "output_layer", None) for c in common.chunk_list(chunk)] if head else []:
            if out is not None:
                vec = torch.randn(out.weight.shape, generator=torch.Generator().manual_seed(9)) * 0.5
                out.weight.data.copy_(vec.to(out.weight.dtype))
        if frozen:
            for p in chunk.parameters():
                p.requires_grad_(False)
        return chunk

    overlaps = Overlaps(grad_reduce=layout.dp > 1, param_gather=False, p2p=False, tp_comm=False)

    def make_trainer(chunk, steps):
        return trainer.Trainer(chunk, layout=layout, overlaps=overlaps, **stage_settings(steps=steps, lr=1e-2))

    prompts = [[INSTR, a, SEP] for a in LETTERS[:8]]
    policy = model()
    # prompts of 3 to 5 tokens: the batch prefills to the shortest, then feeds the longer rows their prompt
    ragged = [p + [LETTERS[-1]] * (i % 3) for i, p in enumerate(prompts)]
    tokens = generation.generate(policy, ragged, max_new_tokens=6, vocab=spec.vocab, eod=-1, seq_length=16,
                                 generator=torch.Generator().manual_seed(7)).tokens
    rm = model(head=True, frozen=True)
    steps = []
    if kind == "ppo":
        cfg = ppo.PPOConfig(max_new_tokens=4, kl_coef=0.05, ppo_epochs=2)
        critic = model(head=True)
        reference = ppo.reference_logprobs(model(frozen=True))
        actor_tr, critic_tr = make_trainer(policy, 2 * iterations), make_trainer(critic, 2 * iterations)
        for it in range(iterations):
            share = trainer.dp_shard(prompts, it, layout.global_batch)
            steps.append(ppo.iteration(actor_trainer=actor_tr, critic_trainer=critic_tr, actor=policy, critic=critic,
                                       reference=reference, scorer=ppo.ModelScorer(rm, 16), prompts=share,
                                       seq_length=16, vocab=spec.vocab, eod=EOD, cfg=cfg,
                                       micro_batch=layout.micro_batch,
                                       generator=torch.Generator().manual_seed(100 + it)))
    else:
        cfg = grpo.GRPOParams(num_generations=2, max_new_tokens=4, beta=0.04, iterations=2)
        reference = model(frozen=True)
        tr = make_trainer(policy, cfg.iterations * iterations)
        queries = [grpo.Query(p, None) for p in prompts]
        for it in range(iterations):
            share = trainer.dp_shard(queries, it, layout.global_batch)
            steps.append(grpo.iteration(tr, policy, reference, share, grpo.ModelReward(rm, 16, 0), cfg,
                                        vocab=spec.vocab, eod=EOD, seq_length=16,
                                        micro_batch=layout.micro_batch * cfg.num_generations, pad_id=0,
                                        generator=torch.Generator().manual_seed(100 + it)))
    return {"tokens": tokens, "steps": steps}
