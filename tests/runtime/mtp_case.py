"""The tiny MLA MoE model with one multi-token prediction depth that the MTP runtime tests train (the quickstart's
data and schedule; shared by tests/runtime/test_train_mtp.py and test_mtp_mcore.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MTP_MODEL = """\
  model tiny_mla_moe_mtp {
    layers = 2
    hidden = 64
    heads = 4
    ffn_hidden = 128
    vocab = 1024
    seq_length = 64
    multi_latent_attention = true
    q_lora_rank = 32
    kv_lora_rank = 32
    qk_head_dim = 16
    qk_pos_emb_head_dim = 8
    v_head_dim = 16
    qk_layernorm = true
    experts = 4
    top_k = 2
    moe_ffn_hidden = 64
    shared_expert_ffn_hidden = 64
    moe_first_dense_layers = 1
    moe_router_score = sigmoid
    moe_expert_bias = true
    moe_load_balancing = seq_aux_loss
    moe_aux_loss_coeff = 1e-4
    mtp_num_layers = 1
    mtp_loss_scaling_factor = 0.3
  }
"""


def mtp_experiment(directory: Path, parallel: str) -> Path:
    """The quickstart with the tiny MLA MoE MTP model on 2 CPU ranks and `parallel` as its parallel block body."""
    text = (EXAMPLES / "quickstart.nemo").read_text()
    start, end = text.index("  model tiny_gpt {"), text.index("  parallel {")
    stop = text.index("  precision = fp32")
    text = text[:start] + MTP_MODEL + "\n  parallel {\n" + parallel + "  }\n\n" + text[stop:]
    text = text.replace("vocab_size = 4096", "vocab_size = 1024").replace("warmup = 30", "warmup = 2")
    data = directory / "data" / "quickstart"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLES / "data" / "quickstart" / "corpus.jsonl", data / "corpus.jsonl")
    path = directory / "mtp.nemo"
    path.write_text(text)
    return path
