"""Builds the tiny Hugging Face Llama that examples/hf_finetune_cpu.nemo fine-tunes (run once; about 5 s):

  config.json, generation_config.json     LlamaConfig: 2 layers, hidden 64, GQA 4/2, vocab 384, eos = <|endoftext|>
  tokenizer.json, tokenizer_config.json   a byte-level BPE trained on the example's data, with a chat template
  model.safetensors                       random weights (seed 0), written by transformers' save_pretrained

Everything is committed (446 KB of fp32 weights, so the example runs as it is and its graph hash is stable);
this script regenerates it. The chat template is the one the SFT stage trains with
(`template(...)` in the .nemo file): `<|user|>\\n...\\n<|assistant|>\\n...\\n` then the end-of-text token.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def main(out: Path = HERE) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(HERE.parents[1] / "data" / "hf_finetune"))
    from make import QA

    from nemoc.runtime.tokenizer import train_byte_level_bpe

    out.mkdir(parents=True, exist_ok=True)
    texts = [f"<|user|>\n{q}\n<|assistant|>\n{r}\n" for q, r in QA] * 4
    tok = train_byte_level_bpe(texts, 384, out / "tokenizer.json")
    eos, pad = tok.eod, tok.pad
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
        "bos_token": None, "model_max_length": 64, "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    config = AutoConfig.for_model("llama", vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None,
                                  eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
