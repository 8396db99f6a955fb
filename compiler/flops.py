"""Parameter counts and FLOPs of a decoder-only transformer (dense, GQA, gated MLPs, MoE).

Input:  a `ModelSpec` (and sequence length, batch, recompute mode where relevant).
Output: breakdowns (frozen dataclasses) of parameters and FLOPs; no side effects, no torch.
Invariants: counts are exact for Megatron-Core's GPT layer spec (fused QKV, optional biases, norms,
optional QK-norm, router, shared expert); `padded_vocab` reproduces Megatron's vocabulary padding.

FLOPs convention (stated because published "model TFLOP/s" differ by it, see docs/cost-model.md):
a multiply-add is 2 FLOPs; backward = 2 x forward (input and weight gradients), so a training step
is 3 x forward. Per token, forward:
    2 x (matmul parameters touched by the token)                  [dense GEMMs, MoE: top_k experts]
  + 2 x 2 x s x (heads x kv_channels) x c                         [QK^T and attention x V]
    (multi-latent attention: 2 x s x heads x (qk_head_dim + qk_pos_emb_head_dim + v_head_dim) x c)
  + 2 x h x V                                                     [logits]
  + D x (2 x (one layer's matmul parameters + 2h x h) + one layer's attention core + 2 x h x V)
                                                                  [multi-token prediction, depth D]
(the MTP terms as Megatron-LM's training.py `num_floating_point_operations` counts them: each depth is one more
layer of the last layer's kind, eh_proj 2h -> h and another pass through the shared output layer)
with c = 1 (undiscounted, NeMo <= 25.07 `flops_formulas.py`, Narayanan et al. 2021 eq. (2)) or
c = 1/2 (causal discount: only the lower triangle of the s x s scores is computed by flash
attention; Megatron-Core / Megatron-Bridge and NeMo >= 25.09); under the causal discount a sliding-window
layer (Gemma 3) attends min(t, w) keys at position t (`window_keys_per_token`). For GPT-3 with h = a x d this is
exactly Narayanan et al.'s 72 B s l h^2 (1 + s/(6h) + V/(12 l h)) for 3 x forward; for Llama it is
NeMo's `llama3()` formula (12 + 12 g/a + 18 f/h + 12 s/h + 6 V/(l h)) x B s l h^2.
Model FLOPs never include recomputation; hardware FLOPs add the recomputed forward (full recompute:
one more forward of every transformer layer; selective: the core attention forward).

Stages other than pretraining (`stage_work`, `stage_model_flops_per_step`): model FLOPs are the FLOPs
the stage's algorithm needs, without recompute, summed over every model pass it makes per step:
a LoRA-frozen base skips its weight-gradient GEMMs (forward + input gradients = 2 x forward for the
GEMMs, the attention core's backward is still 2 x its forward, plus 6 x adapter parameters per
token); preference stages (DPO, reward) run every pair as two sequences; DPO adds one reference
forward; PPO counts the rollout (with a KV cache, generating a response computes exactly a causal
forward of the sequence), the experience forwards and `ppo_epochs` actor and critic updates; eval is
one forward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from nemoc.compiler.params import StageParams as KindParams  # (StageParams below: a pipeline stage's counts)
from nemoc.compiler.spec import LoraSpec, ModelSpec

MEGATRON_VOCAB_DIVISOR = 128  # Megatron-LM `--make-vocab-size-divisible-by` default


def padded_vocab(vocab: int, tp: int = 1, divisor: int = MEGATRON_VOCAB_DIVISOR) -> int:
    """Megatron pads the vocabulary to a multiple of divisor x TP (megatron/training/tokenizer
    `_vocab_size_with_padding`) so every TP rank holds an equal vocabulary shard."""
    multiple = divisor * tp
    return -(-vocab // multiple) * multiple


def is_gated(model: ModelSpec) -> bool:
    """SwiGLU (and GeGLU) MLPs have two input projections (gate and up): fc1 is h x 2f."""
    return model.activation in ("swiglu", "geglu", "geglu_tanh")


def lora_params_per_layer(model: ModelSpec, lora: LoraSpec) -> int:
    """LoRA adapter parameters per layer: rank x (in + out) for each targeted linear
    (Hu et al. 2021; NeMo/Megatron-Bridge target names qkv (linear_qkv), proj, fc1, fc2; peft's q k v o gate
    up down, one adapter each)."""
    h, d, r = model.hidden, model.head_dim, lora.rank
    ffn = model.moe_ffn_hidden or model.ffn_hidden
    fc1_out = ffn * (2 if is_gated(model) else 1)
    shapes = {"qkv": (h, (model.heads + 2 * model.query_groups) * d), "proj": (model.heads * d, h),
              "fc1": (h, fc1_out), "fc2": (ffn, h),
              # peft's names: one adapter per projection (as the runtime's peft-granular LoRA installs them)
              "q": (h, model.heads * d), "k": (h, model.query_groups * d), "v": (h, model.query_groups * d),
              "o": (model.heads * d, h), "up": (h, ffn), "down": (ffn, h)}
    shapes["gate"] = (h, ffn)
    if model.multi_latent_attention:
        # `qkv` on MLA: one adapter on each query/key/value projection (as the LoRA runtime installs them), the
        # output projection reads heads x v_head_dim (multi_latent_attention.py MLASelfAttention)
        shapes["qkv"] = _mla_qkv_adapters(model)
        shapes["proj"] = shapes["o"] = (model.heads * model.v_head_dim, h)
    same = {"o": "proj", "down": "fc2"}  # one layer, one adapter, two names
    if not is_gated(model):
        same["gate"] = "up"  # a non-gated fc1 has one projection: gate and up name its one adapter
    experts = max(1, model.experts) if model.is_moe else 1
    total = 0
    for target in dict.fromkeys(same.get(t, t) for t in lora.targets):
        if target in shapes:
            n_in, n_out = shapes[target]
            total += r * (n_in + n_out) * (experts if target in ("fc1", "fc2", "gate", "up", "down") else 1)
    return total


def lora_params_of_layers(model: ModelSpec, lora: LoraSpec, layers: int, dense_layers: int = 0) -> int:
    """LoRA parameters of `layers` transformer layers, `dense_layers` of them dense layers of a MoE model (whose
    MLP adapters wrap one MLP of ffn_hidden, not every expert's)."""
    own = lora_params_per_layer(model, lora)
    if not dense_layers:
        return layers * own
    return (layers - dense_layers) * own + dense_layers * lora_params_per_layer(model.dense_layer_model, lora)
def _mla_qkv_adapters(model: ModelSpec) -> tuple[int, int]:
    """(summed fan-in, summed fan-out) of the MLA projections `qkv` adapts, so rank x (in + out) is their
    adapters' parameters: linear_q_proj h -> heads x (qk + pe) without a query latent, else linear_q_down_proj
    h -> q_lora_rank and linear_q_up_proj q_lora_rank -> heads x (qk + pe); linear_kv_down_proj
    h -> kv_lora_rank + pe; linear_kv_up_proj kv_lora_rank -> heads x (qk + v)."""
    h, n = model.hidden, model.heads
    q_out = n * (model.qk_head_dim + model.qk_pos_emb_head_dim)
    q = [(h, model.q_lora_rank), (model.q_lora_rank, q_out)] if model.q_lora_rank else [(h, q_out)]
    kv = [(h, model.kv_lora_rank + model.qk_pos_emb_head_dim),
          (model.kv_lora_rank, n * (model.qk_head_dim + model.v_head_dim))]
    return sum(i for i, _ in q + kv), sum(o for _, o in q + kv)


@dataclass(frozen=True, slots=True)
class ParamCounts:
    """Parameters by component (exact, for the unpadded vocabulary)."""

    embedding: int  # word (+ learned position) embeddings
    output: int  # output projection (0 when tied to the input embedding)
    attention: int  # per layer: QKV + output projection (+ biases, QK-norm)
    mlp: int  # per layer: dense MLP, or all experts + router + shared expert
    mlp_active: int  # per layer: what one token touches (top_k experts + shared + router)
    expert: int  # per layer: the routed experts alone (sharded by EP x ETP)
    norms: int  # per layer: the two pre-norms (+ the two post-block norms of Gemma 3)
    final_norm: int
    layers: int
    # a MoE model's dense layers (`ModelSpec.moe_layer_pattern` 0s): how many, and one's MLP (ffn_hidden);
    # `mlp`, `mlp_active` and `expert` above are an expert layer's
    dense_layers: int = 0
    dense_mlp: int = 0
    # multi-token prediction (`ModelSpec.mtp_num_layers`): the MTP modules' own parameters, outside `total` (the
    # paper's 671B counts the main model; the MTP module is stated separately, DeepSeek-V3 Sec. 2.2 / HF README);
    # embedding and output layer are shared with the main model
    mtp: int = 0

    @property
    def total_with_mtp(self) -> int:
        """Every parameter Megatron-Core builds: the main model and the MTP modules."""
        return self.total + self.mtp

    @property
    def per_layer(self) -> int:
        """One expert layer of a MoE model (a layer of a dense one)."""
        return self.attention + self.mlp + self.norms

    @property
    def dense_per_layer(self) -> int:
        """One dense layer of a MoE model (attention, MLP of ffn_hidden, norms)."""
        return self.attention + self.dense_mlp + self.norms

    def layer_params(self, moe_layers: int, dense_layers: int = 0) -> int:
        """Parameters of `moe_layers` expert layers and `dense_layers` dense layers (a stage's share)."""
        return moe_layers * self.per_layer + dense_layers * self.dense_per_layer

    @property
    def total(self) -> int:
        moe = self.layers - self.dense_layers
        return self.embedding + self.output + self.layer_params(moe, self.dense_layers) + self.final_norm

    @property
    def active(self) -> int:
        """Parameters a token touches (MoE: top_k experts in the expert layers); = total for a dense model."""
        moe = self.layers - self.dense_layers
        layers = moe * (self.attention + self.mlp_active + self.norms) + self.dense_layers * self.dense_per_layer
        return self.embedding + self.output + layers + self.final_norm

    @property
    def gemm_per_token(self) -> int:
        """Weights one token multiplies through in the transformer layers (attention + active MLP of every
        layer: the expert layers' top_k experts, router and shared experts, the dense layers' MLP)."""
        moe = self.layers - self.dense_layers
        return self.layers * self.attention + moe * self.mlp_active + self.dense_layers * self.dense_mlp


def _norm_params(model: ModelSpec, width: int) -> int:
    return width * (2 if model.norm == "layernorm" else 1)  # LayerNorm has a bias, RMSNorm has not


def _mlp_params(model: ModelSpec, ffn: int) -> int:
    """One MLP (dense or one expert): fc1 h x (2f if gated else f), fc2 f x h, optional biases."""
    fc1_out = ffn * (2 if is_gated(model) else 1)
    weights = model.hidden * fc1_out + ffn * model.hidden
    return weights + ((fc1_out + model.hidden) if model.add_bias_linear else 0)


def mla_projection_shapes(model: ModelSpec) -> tuple[tuple[str, int, int], ...]:
    """(name, in, out) of every linear of one multi-latent attention layer, as Megatron-Core 0.16.1's
    MLASelfAttention builds them (multi_latent_attention.py `__init__`): the query down / up projections
    through the q_lora_rank latent (or `linear_q_proj`, h -> heads x (qk + pe), when q_lora_rank is None),
    the key/value down projection h -> kv_lora_rank + qk_pos_emb_head_dim (the latent and the key's RoPE
    part, shared by every head), its up projection kv_lora_rank -> heads x (qk + v), and the output
    projection heads x v -> h. No biases but the output projection's (add_bias_linear)."""
    h, a, r = model.hidden, model.heads, model.q_lora_rank
    q_out = a * (model.qk_head_dim + model.qk_pos_emb_head_dim)
    q = (("q_down", h, r), ("q_up", r, q_out)) if r else (("q", h, q_out),)
    return q + (("kv_down", h, model.kv_lora_rank + model.qk_pos_emb_head_dim),
                ("kv_up", model.kv_lora_rank, a * (model.qk_head_dim + model.v_head_dim)),
                ("proj", a * model.v_head_dim, h))


def _mla_params(model: ModelSpec) -> int:
    """MLA weights (`mla_projection_shapes`), the output projection's bias, and with qk_layernorm the norms
    of the query latent (q_lora_rank wide, only with a query latent) and of the key/value latent
    (kv_lora_rank), which the local spec builds as its QK norm and the TE spec fuses into the up projections."""
    params = sum(n_in * n_out for _, n_in, n_out in mla_projection_shapes(model))
    if model.add_bias_linear:
        params += model.hidden
    if model.qk_layernorm:
        params += _norm_params(model, model.kv_lora_rank) + (_norm_params(model, model.q_lora_rank)
                                                              if model.q_lora_rank else 0)
    return params


def _attention_params(model: ModelSpec) -> int:
    if model.multi_latent_attention:
        return _mla_params(model)
    d, a, g, h = model.head_dim, model.heads, model.query_groups, model.hidden
    qkv_out = (a + 2 * g) * d
    params = h * qkv_out + a * d * h
    if model.add_bias_linear or model.add_qkv_bias:
        params += qkv_out
    if model.add_bias_linear:
        params += h
    if model.qk_layernorm:
        params += 2 * _norm_params(model, d)
    return params


@lru_cache(maxsize=512)
def param_counts(model: ModelSpec) -> ParamCounts:
    """Exact parameter counts of Megatron-Core's GPT model for `model` (unpadded vocabulary)."""
    h = model.hidden
    embedding = model.vocab * h + (model.seq_length * h if model.position == "learned" else 0)
    output = 0 if model.tie_embeddings else model.vocab * h
    if model.is_moe:
        ffn = model.moe_ffn_hidden or model.ffn_hidden
        expert = _mlp_params(model, ffn)
        shared = _mlp_params(model, model.shared_expert_ffn_hidden) if model.shared_expert_ffn_hidden else 0
        router = h * model.experts
        mlp = model.experts * expert + shared + router
        mlp_active = model.top_k * expert + shared + router
        experts_total = model.experts * expert
    else:
        mlp = mlp_active = _mlp_params(model, model.ffn_hidden)
        experts_total = 0
    dense_layers = model.layers - model.moe_layer_count if model.is_moe else 0
    counts = ParamCounts(
        embedding=embedding, output=output, attention=_attention_params(model), mlp=mlp,
        mlp_active=mlp_active, expert=experts_total, norms=(4 if model.post_block_norms else 2) * _norm_params(model, h),
        final_norm=_norm_params(model, h), layers=model.layers,
        dense_layers=dense_layers, dense_mlp=_mlp_params(model, model.ffn_hidden) if dense_layers else 0,
    )
    return replace(counts, mtp=model.mtp_num_layers * mtp_layer_params(model, counts)) if model.mtp_num_layers else counts


def mtp_layer_params(model: ModelSpec, counts: ParamCounts) -> int:
    """One multi-token prediction depth (Megatron-Core 0.16.1 transformer/multi_token_prediction.py
    `MultiTokenPredictionLayer.__init__`): `enorm` and `hnorm` (norms of the next token's embedding and of the
    previous depth's hidden state), `eh_proj` (a column-parallel linear 2h -> h, bias=False), `transformer_layer`
    (the decoder block's last layer spec: an expert layer when the last layer is one, `ModelSpec.mtp_layer_is_moe`)
    and `final_layernorm`; the embedding and the output layer are the main model's."""
    h = model.hidden
    layer = counts.per_layer if model.mtp_layer_is_moe or not model.is_moe else counts.dense_per_layer
    return layer + 3 * _norm_params(model, h) + 2 * h * h


def mtp_layer_gemm_params(model: ModelSpec, counts: ParamCounts) -> int:
    """Weights one token multiplies through in one MTP depth: its layer's attention and active MLP (`mtp_layer_is_moe`)
    and eh_proj's 2h x h."""
    mlp = counts.mlp_active if model.mtp_layer_is_moe or not model.is_moe else counts.dense_mlp
    return counts.attention + mlp + 2 * model.hidden * model.hidden


def layers_on_stage(layers: int, pp: int, stage: int, split: tuple[int, int, int] | None = None) -> int:
    """Transformer layers on pipeline stage `stage` (0-based). `split` = (first, middle, last): the
    counts of the split nemoc gives Megatron (`rules.PipelineSplit.stage_layers`: even, uneven
    first/last, or with the embedding / loss counted as layers). Without it: Megatron's even split
    (`get_num_layers_to_build`); when `layers % pp != 0` the remainder goes to the first stages, so
    the most-loaded stage has ceil(layers / pp) layers."""
    if split is not None and pp > 1:
        return split[0] if stage == 0 else split[2] if stage == pp - 1 else split[1]
    base, extra = divmod(layers, pp)
    return base + (1 if stage < extra else 0)


# Precisions whose GEMMs run below 16 bits, where Megatron-Core can keep the first / last layers in bf16
# (`first_last_layers_bf16`: fp8_utils.py `get_fp8_context`, fp4_utils.py `get_fp4_context`)
LOW_PRECISIONS = ("fp8", "mxfp8", "nvfp4")


def chunk_runs(layers: int, pp: int, vp: int | None, split: tuple[int, int, int] | None) -> list[tuple[int, int, int]]:
    """(pipeline stage, first global layer, layer count) of every model chunk, in Megatron-Core's global
    layer order: chunk c of every stage before chunk c + 1 of any (transformer_layer.py
    `get_transformer_layer_offset`, transformer_block.py `get_num_layers_to_build`). A stage's layers are
    split evenly over its `vp` chunks, except where the split counts the embedding / the loss as a layer:
    there the first chunk of the first stage / the last chunk of the last stage builds one layer fewer than
    its `stage / vp` share. `split` = (first, middle, last) stage counts (`PipelineSplit.stage_layers`) tells
    which: Megatron asserts every count of an uneven first / last split a multiple of vp (as the middle's), so
    with vp > 1 a first / last count that is not one is the embedding's / the loss's."""
    chunks = vp or 1
    stage_counts = [layers_on_stage(layers, pp, s, split) for s in range(pp)]
    embedding = chunks > 1 and split is not None and stage_counts[0] % chunks != 0
    loss = chunks > 1 and split is not None and stage_counts[-1] % chunks != 0
    shares = [n + (1 if s == 0 and embedding else 0) + (1 if s == pp - 1 and loss else 0)
              for s, n in enumerate(stage_counts)]
    runs, offset = [], 0
    for c in range(chunks):
        for s in range(pp):
            n = shares[s] // chunks
            n -= (1 if embedding and (s, c) == (0, 0) else 0) + (1 if loss and (s, c) == (pp - 1, chunks - 1) else 0)
            runs.append((s, offset, n))
            offset += n
    return runs


def bf16_layers_per_stage(layers: int, pp: int, vp: int | None, split: tuple[int, int, int] | None,
                          first: int, last: int) -> tuple[int, ...]:
    """How many of the model's first `first` and last `last` transformer layers (kept in bf16) each pipeline
    stage holds. Megatron-Core numbers layers globally and keeps a layer in bf16 when it is among the first OR
    the last (fp8_utils.py `is_first_last_bf16_layer`: layer_no < start or >= num_layers - end), so a layer in
    both ranges counts once; the layers sit on the stages as `chunk_runs` places them. Without virtual stages
    the first layers sit on stage 0 and the last on the last stage; with them they spread over the stages'
    first / last chunks."""
    counts = [0] * pp
    tail = layers - last
    for stage, lo, n in chunk_runs(layers, pp, vp, split):
        hi = lo + n
        in_first = max(0, min(hi, first) - lo)
        in_last = max(0, hi - max(lo, tail))
        in_both = max(0, min(hi, first) - max(lo, tail))
        counts[stage] += in_first + in_last - in_both
    return tuple(counts)


@lru_cache(maxsize=4096)
def dense_layers_per_stage(model: ModelSpec, pp: int, vp: int | None,
                           split: tuple[int, int, int] | None) -> tuple[int, ...]:
    """How many dense layers of a MoE model (`ModelSpec.moe_layer_pattern` 0s) each pipeline stage builds:
    Megatron-Core slices the per-layer specs at each chunk's global offset (gpt_layer_specs.py
    `get_gpt_decoder_block_spec`: `layer_specs[offset : offset + num_layers_to_build]`), which `chunk_runs`
    reproduces. All 0 for a dense model or a MoE model with every layer sparse."""
    counts = [0] * pp
    if not model.has_dense_layers:
        return tuple(counts)
    pattern = model.moe_layer_pattern
    for stage, lo, n in chunk_runs(model.layers, pp, vp, split):
        counts[stage] += n - sum(pattern[lo:lo + n])
    return tuple(counts)


def bf16_dense_layers_per_stage(model: ModelSpec, pp: int, vp: int | None, split: tuple[int, int, int] | None,
                                first: int, last: int) -> tuple[int, ...]:
    """Of `bf16_layers_per_stage`'s bf16 layers, how many are dense layers of a MoE model on each stage (DeepSeek's
    first layers are both: dense, and the first layers an FP8 recipe keeps in bf16). All 0 without dense layers."""
    counts = [0] * pp
    if not model.has_dense_layers or not (first or last):
        return tuple(counts)
    pattern, tail = model.moe_layer_pattern, model.layers - last
    for stage, lo, n in chunk_runs(model.layers, pp, vp, split):
        counts[stage] += sum(1 for i in range(lo, lo + n) if (i < first or i >= tail) and not pattern[i])
    return tuple(counts)


def chunk_layers(layers: int, pp: int, vp: int | None) -> int:
    """Transformer layers of the most-loaded model chunk (one pipeline stage, or one of its `vp`
    virtual stages): Megatron's block recompute (`recompute_method = "block"`) counts
    `recompute_num_layers` per chunk (transformer_block.py `_checkpointed_forward`)."""
    return -(-layers // (pp * (vp or 1)))


def recomputed_fraction(layers: int, pp: int, vp: int | None, recompute: str, recompute_layers: int | None) -> float:
    """Share of the transformer layers whose whole forward is replayed in the backward: 1 with full
    recompute of every layer, min(n, chunk) / chunk with block recompute of n layers per chunk, 0
    otherwise (selective recompute replays only the attention core, costed separately)."""
    if recompute != "full":
        return 0.0
    if recompute_layers is None:
        return 1.0
    chunk = chunk_layers(layers, pp, vp)
    return min(recompute_layers, chunk) / chunk


@dataclass(frozen=True, slots=True)
class StageParams:
    """Parameters held by one pipeline stage, before TP/EP sharding, by sharding class."""

    dense: int  # sharded by TP (attention, dense MLP, norms: replicated but small)
    expert: int  # sharded by EP x ETP
    embedding: int  # word embedding / output layer on this stage (vocab-parallel, sharded by TP)

    @property
    def total(self) -> int:
        return self.dense + self.expert + self.embedding


def stage_params(model: ModelSpec, pp: int, stage: int) -> StageParams:
    """Parameters on pipeline stage `stage`: its layers; the embedding on the first stage; the
    output layer and final norm on the last (with tied embeddings and pp > 1 the last stage keeps its
    own copy of the word embedding, which Megatron all-reduces with the first stage's)."""
    counts = param_counts(model)
    n = layers_on_stage(model.layers, pp, stage)
    d = dense_layers_per_stage(model, pp, None, None)[stage]
    expert = (n - d) * counts.expert
    dense = counts.layer_params(n - d, d) - expert
    embedding = 0
    if stage == 0:
        embedding += counts.embedding
    if stage == pp - 1:
        dense += counts.final_norm
        embedding += model.vocab * model.hidden if (model.tie_embeddings and pp > 1) else counts.output
        if model.mtp_num_layers:  # the MTP depths (`mtp_stage_params`) and, past stage 0, their embedding copy
            mtp_dense, mtp_expert, mtp_embedding = mtp_stage_params(model, counts, pp)
            dense, expert, embedding = dense + mtp_dense, expert + mtp_expert, embedding + mtp_embedding
    return StageParams(dense=dense, expert=expert, embedding=embedding)


def mtp_layer_equivalents(model: ModelSpec) -> int:
    """The multi-token prediction depths' work on the last pipeline stage in decoder layers (forward FLOPs per token
    at the model's sequence length, rounded; at least 1 with MTP, 0 without): each depth is one more layer, eh_proj
    and another pass through the output layer (DeepSeek-V3: 3.39 GFLOP against 1.34 per mean layer, so 3). The
    pipeline split balances the last stage with it (`rules.pipeline.pipeline_split`'s `last_load`), as
    Megatron-Bridge's DeepSeek-V3 layouts give the MTP stage fewer decoder layers (PP 16: 4 x 15 + 1, then mtp,
    loss)."""
    n = model.mtp_num_layers
    if not n:
        return 0
    f = flops_per_token(model, model.seq_length, True)
    per_layer = (f.dense_gemm + f.attention_core) / model.layers
    return max(1, round((f.mtp + f.logits * n / (1 + n)) / per_layer))


def mtp_stage_params(model: ModelSpec, counts: ParamCounts, pp: int) -> tuple[int, int, int]:
    """(dense, expert, embedding) parameters the multi-token prediction depths add to the last pipeline stage, where
    Megatron-Core 0.16.1 builds them without a pipeline layout (multi_token_prediction.py `mtp_on_this_rank`,
    `get_mtp_num_layers_to_build`: the last stage, its last virtual chunk). The MTP stage needs the word embedding
    (the next tokens' embeddings): past stage 0 it builds its own copy, tied to stage 0's (gpt_model.py: `if
    self.pre_process or self.mtp_process` builds the embedding; `sharded_state_dict` ties it). With tied embeddings
    the output layer there still allocates its own weight (`skip_weight_param_allocation=self.pre_process and ...`),
    so the copy is added either way (a tied pipeline with MTP is E210: Megatron-Core cannot checkpoint it)."""
    expert = model.mtp_num_layers * counts.expert if model.mtp_layer_is_moe else 0
    dense = counts.mtp - expert
    embedding = model.vocab * model.hidden if pp > 1 else 0
    return dense, expert, embedding


@dataclass(frozen=True, slots=True)
class FlopsPerToken:
    """Forward FLOPs per token, by term (training = 3 x forward)."""

    dense_gemm: int  # attention projections + MLP (active experts) + router
    attention_core: float  # QK^T and attention x V (causally discounted or not)
    logits: int  # the output layer's (x (1 + mtp_num_layers): each MTP depth runs the shared output layer again)
    # multi-token prediction depths: their layers' GEMMs and attention core and eh_proj (2h -> h), as Megatron-LM's
    # training.py `num_floating_point_operations` counts them (an MTP layer is a layer of the last layer's kind)
    mtp: float = 0.0

    @property
    def forward(self) -> float:
        return self.dense_gemm + self.attention_core + self.logits + self.mtp


def window_keys_per_token(seq_length: int, window: int) -> float:
    """Keys a query attends to on average under a causal sliding window of `window` tokens (itself and the
    window - 1 before it): sum_t min(t, w) / s = (w (w + 1) / 2 + (s - w) w) / s, which is the causal s/2
    (plus 1/2) when w >= s. The causal discount's counterpart: a kernel that skips masked blocks (flash
    attention's window_size) computes this many, one that materialises the mask computes s."""
    w = min(window, seq_length)
    return (w * (w + 1) / 2 + (seq_length - w) * w) / seq_length


@lru_cache(maxsize=4096)
def flops_per_token(model: ModelSpec, seq_length: int, causal_discount: bool) -> FlopsPerToken:
    """Forward FLOPs per token (see module docstring for the formula and its sources)."""
    counts = param_counts(model)
    gemm_params = counts.gemm_per_token  # every layer's; biases/norms are a rounding error (<0.01 %)
    # QK^T over qk_dim channels and attention x V over v_dim channels per head (both head_dim but for MLA,
    # whose queries and keys carry qk_head_dim + qk_pos_emb_head_dim channels and values v_head_dim)
    attn_width = model.heads * (model.qk_dim + model.v_dim) / 2.0
    core = 4.0 * seq_length * attn_width * (0.5 if causal_discount else 1.0)
    sliding = model.sliding_layers
    if sliding and causal_discount and model.sliding_window < seq_length:
        core_window = 4.0 * attn_width * window_keys_per_token(seq_length, model.sliding_window)
        attention = (model.layers - sliding) * core + sliding * core_window
    else:
        attention = model.layers * core
    n_mtp = model.mtp_num_layers
    mtp = 0.0
    if n_mtp:  # each depth: one more layer (core as the layer after the last one attends) and eh_proj
        mtp_core = (4.0 * attn_width * window_keys_per_token(seq_length, model.sliding_window)
                    if model.is_sliding_layer(model.layers + 1) and causal_discount else core)
        mtp = n_mtp * (2.0 * mtp_layer_gemm_params(model, counts) + mtp_core)
    return FlopsPerToken(
        dense_gemm=2 * gemm_params,
        attention_core=attention,
        logits=2 * model.hidden * model.vocab * (1 + n_mtp),
        mtp=mtp,
    )


def model_flops_per_step(model: ModelSpec, seq_length: int, global_batch: int, *, causal_discount: bool) -> float:
    """Model FLOPs of one training step (3 x forward, no recompute): what MFU is measured against."""
    return 3.0 * flops_per_token(model, seq_length, causal_discount).forward * seq_length * global_batch


def hardware_flops_per_step(model: ModelSpec, seq_length: int, global_batch: int, *, recompute: str,
                            causal_discount: bool, train: bool = True,
                            recompute_modules: tuple[str, ...] | None = None) -> float:
    """FLOPs the GPUs execute in one step: model FLOPs plus the recomputed forward (full: every
    transformer layer again, logits excluded, Narayanan et al. 2021 Sec. 5.1; selective: the modules
    of `recompute_modules`, by default the core attention, Korthikanti et al. 2022 Sec. 5:
    `selective_recompute_flops_per_token`). `train=False` (eval) is one forward pass."""
    f = flops_per_token(model, seq_length, causal_discount)
    tokens = seq_length * global_batch
    if not train:
        return f.forward * tokens
    # full recompute replays the MTP depths too (Megatron's uniform method, recompute_num_layers 1:
    # MultiTokenPredictionLayer._checkpointed_forward), never the logits
    extra = f.dense_gemm + f.attention_core + f.mtp if recompute == "full" else 0.0
    if recompute == "selective":
        extra = selective_recompute_flops_per_token(model, seq_length, causal_discount,
                                                    recompute_modules or ("core_attn",))
    return (3.0 * f.forward + extra) * tokens


def selective_recompute_flops_per_token(model: ModelSpec, seq_length: int, causal_discount: bool,
                                        modules: tuple[str, ...]) -> float:
    """Forward FLOPs per token that selective recompute of `modules` runs again in the backward: the
    attention core (`core_attn`), the dense MLP's GEMMs (`mlp`, dense layers only), the MoE layer's
    router, routed experts (top_k per token) and shared experts (`moe`), the shared experts alone
    (`shared_experts`). `layernorm` and `moe_act` replay element-wise kernels only (no GEMM FLOPs)."""
    f = flops_per_token(model, seq_length, causal_discount)
    counts = param_counts(model)
    shared = _mlp_params(model, model.shared_expert_ffn_hidden) if model.shared_expert_ffn_hidden else 0
    extra = f.attention_core if "core_attn" in modules else 0.0
    moe_layers = model.layers - counts.dense_layers if model.is_moe else 0
    if "mlp" in modules:  # the dense layers' MLPs (every layer of a dense model)
        extra += 2.0 * (model.layers - moe_layers) * (counts.dense_mlp if model.is_moe else counts.mlp_active)
    if "moe" in modules and model.is_moe:
        extra += 2.0 * moe_layers * counts.mlp_active  # router + top_k experts + shared experts
    elif "shared_experts" in modules and model.is_moe:
        extra += 2.0 * moe_layers * shared
    return extra


# ------------------------------------------------------------------------- what a stage computes


FULL, FROZEN, FORWARD = 2.0, 1.0, 0.0  # backward / forward GEMM ratio of a pass


@dataclass(frozen=True, slots=True)
class ModelPass:
    """`count` passes of one model over every sequence of the global batch, per step.
    `backward`: FULL (input and weight gradients), FROZEN (LoRA: the frozen base computes input
    gradients only), FORWARD (no backward). `scalar_head`: a value/reward head (h x 1) replaces the
    output layer (no logits, no vocabulary softmax)."""

    model: str
    count: float
    backward: float
    scalar_head: bool = False


@dataclass(frozen=True, slots=True)
class StageWork:
    """The model passes of one step of a stage. `rows`: sequences per global-batch sample (2 for
    preference pairs: chosen and rejected). `passes[0]` is the pass the optimizer step follows (the
    policy / actor / reward model being trained). `generated`: tokens decoded per sample (PPO
    rollout, 0 otherwise); `trained`: models updated by an optimizer each step."""

    rows: int
    passes: tuple[ModelPass, ...]
    generated: int = 0
    trained: int = 1


def stage_work(stage_kind: str, params: object = None, peft: LoraSpec | None = None) -> StageWork:
    """What one step of a stage computes (the nemoc runtime's algorithms for each stage kind):
      pretrain / sft: the policy, forward + backward (FROZEN under LoRA);
      dpo (Rafailov et al. 2023): pairs as 2 rows; the policy forward + backward and one forward of
          the frozen reference (with LoRA: the base with adapters off). `reference = precomputed`
          runs that forward once per pair before training instead of inside the step: the same work,
          amortised over one epoch's steps; `reference_free` has none;
      reward (Ouyang et al. 2022, eq. 1): pairs as 2 rows through a scalar-head model;
      ppo: rollout of `max_new_tokens` per prompt, experience forwards of actor, reference,
          critic and reward model, then `ppo_epochs` updates of actor and critic (with LoRA the actor's
          adapters and the whole critic; the reference is the actor with its adapters off);
      kto (Ethayarajh et al. 2024): one row per example; policy forward + backward, and for the KL
          baseline z0 one policy forward (no grad) of the mismatched rows; the reference scores both;
      orpo (Hong et al. 2024): pairs as 2 rows through the policy, no reference;
      grpo (Shao et al. 2024): `num_generations` completions per prompt (rows), rollout of
          `max_new_tokens` each, reference and reward-model forwards (absent with beta = 0 / a
          verifier), `iterations` policy updates;
      eval: one forward; export: nothing."""
    train = FROZEN if peft is not None else FULL
    params = KindParams.of(stage_kind, params)  # a mapping (or None: every default) becomes the kind's record
    if stage_kind == "export":
        return StageWork(1, (), trained=0)
    if stage_kind == "eval":
        return StageWork(1, (ModelPass("policy", 1.0, FORWARD),), trained=0)
    if stage_kind == "dpo":
        passes = (ModelPass("policy", 1.0, train),)
        if not params.reference_free:
            passes += (ModelPass("reference", 1.0, FORWARD),)
        return StageWork(2, passes)
    if stage_kind == "reward":
        # trained whole even with `peft` (`runners.run_reward` applies no adapters), as PPO's critic
        return StageWork(2, (ModelPass("reward", 1.0, FULL, scalar_head=True),))
    if stage_kind == "orpo":  # chosen and rejected rows through the policy, no reference (Hong et al. 2024)
        return StageWork(2, (ModelPass("policy", 1.0, train),))
    if stage_kind == "kto":
        passes = (ModelPass("policy", 1.0, train),)
        if params.loss == "kto":  # the KL baseline: mismatched pairs, policy and reference
            passes += (ModelPass("policy (KL pairs)", 1.0, FORWARD), ModelPass("reference", 2.0, FORWARD))
        else:
            passes += (ModelPass("reference", 1.0, FORWARD),)
        return StageWork(1, passes)
    if stage_kind == "grpo":
        groups, mu = params.num_generations, float(params.iterations)
        passes = (ModelPass("policy", mu, train),)
        if mu > 1:  # the sampling policy's log-probs, kept for the clipped ratio of the later iterations
            passes += (ModelPass("policy (old log-probs)", 1.0, FORWARD),)
        if params.beta != 0.0:
            passes += (ModelPass("reference", 1.0, FORWARD),)
        if not params.reward:
            passes += (ModelPass("reward", 1.0, FORWARD, scalar_head=True),)
        return StageWork(groups, passes, generated=params.max_new_tokens)
    if stage_kind == "ppo":
        epochs, new = float(params.ppo_epochs), params.max_new_tokens
        return StageWork(1, (
            # the critic is trained whole even under LoRA (`runners.run_ppo` applies no adapters to it)
            ModelPass("actor", epochs, train), ModelPass("critic", epochs, FULL, scalar_head=True),
            ModelPass("actor (old log-probs)", 1.0, FORWARD), ModelPass("reference", 1.0, FORWARD),
            ModelPass("critic (values)", 1.0, FORWARD, scalar_head=True),
            ModelPass("reward", 1.0, FORWARD, scalar_head=True),
        ), generated=new, trained=2)
    return StageWork(1, (ModelPass("policy", 1.0, train),))


def pass_flops_per_token(model: ModelSpec, seq_length: int, p: ModelPass, peft: LoraSpec | None = None, *,
                         causal_discount: bool = True) -> float:
    """Model FLOPs of one pass per token (no recompute). FULL: 3 x forward. FROZEN (LoRA): the base
    GEMMs run forward and input gradient (2 x), the attention core forward and its full backward
    (3 x: it has no weights, its backward is all input gradients), the adapters 6 x their
    parameters. FORWARD: 1 x. A scalar head costs 2h instead of the logits' 2hV."""
    f = flops_per_token(model, seq_length, causal_discount)
    head = 2.0 * model.hidden if p.scalar_head else f.logits
    if p.backward == FORWARD:
        return f.dense_gemm + f.attention_core + head + f.mtp
    if p.backward == FULL:
        return 3.0 * (f.dense_gemm + f.attention_core + head + f.mtp)
    dense = model.layers - model.moe_layer_count if model.has_dense_layers else 0
    adapters = 2.0 * lora_params_of_layers(model, peft, model.layers, dense) if peft is not None else 0.0
    return 2.0 * (f.dense_gemm + head) + 3.0 * f.attention_core + 3.0 * adapters


def stage_model_flops_per_step(model: ModelSpec, seq_length: int, global_batch: int, *, stage_kind: str = "pretrain",
                               peft: LoraSpec | None = None, params: object = None,
                               causal_discount: bool = True) -> float:
    """Model FLOPs of one step of a stage: what `mfu` divides (see the module docstring). For
    pretraining (and full SFT) this is `model_flops_per_step`. The PPO rollout adds one causal
    forward per prompt: with a KV cache, prefill + decode compute exactly that."""
    work = stage_work(stage_kind, params, peft)
    tokens = float(seq_length) * global_batch * work.rows
    total = sum(p.count * pass_flops_per_token(model, seq_length, p, peft, causal_discount=causal_discount)
                for p in work.passes)
    if work.generated:
        total += flops_per_token(model, seq_length, causal_discount).forward
    return total * tokens
