"""End-of-turn tokens (runtime/align/data.py `stop_ids`): a ChatML tokenizer whose eos is <|endoftext|> ends
its assistant turns with <|im_end|>; rollouts and eval generations stop there, the exported
generation_config.json lists both ids and transformers' `generate` stops at the turn end. KTO examples and
GRPO / PPO prompts are tokenized once across two gloo ranks (stage.tokenized_once)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from align_helpers import gpt2_spec

from nemoc.runtime import generation
from nemoc.runtime.align import data
from nemoc.runtime.hf import chat

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>", "</s>"]
WORDS = ["What is 3 plus 4?", "3 plus 4 is 7.", "Say hi.", "hi there", "system user assistant"]


def _save(root: Path, name: str, specials=SPECIALS, **kwargs) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(WORDS * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = kwargs.pop("chat_template", None)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if template:
        fast.chat_template = template
    fast.save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A ChatML tokenizer directory (eos <|endoftext|>, its own ChatML chat_template) and a Llama 3-style one
    (eos <|end_of_text|>, no template: the built-in llama3 ends turns with <|eot_id|>)."""
    root = tmp_path_factory.mktemp("eot")
    return {"chatml": _save(root, "chatml", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            chat_template=chat.BUILTIN_TEMPLATES["chatml"]),
            "llama": _save(root, "llama", specials=SPECIALS[1:], bos_token="<|begin_of_text|>",
                           eos_token="<|end_of_text|>")}


def _load(directory, name="tokenizer"):
    from nemoc.runtime.tokenizer import load_tokenizer

    return data.template_for({"template": {"name": name}}, str(directory)), load_tokenizer(str(directory))


def test_stop_ids_are_read_from_the_template_and_the_tokenizer(dirs):
    template, tok = _load(dirs["chatml"])
    ids = tok.special_tokens
    assert template.turn_end_text() == "<|im_end|>\n"
    assert data.stop_ids(template, tok) == (ids["<|endoftext|>"], ids["<|im_end|>"])
    template, tok = _load(dirs["llama"], "llama3")
    ids = tok.special_tokens
    assert tok.eod == ids["<|end_of_text|>"]  # EOD differs from the turn end, as in Llama 3
    assert data.stop_ids(template, tok) == (ids["<|end_of_text|>"], ids["<|eot_id|>"])
    template, tok = _load(dirs["llama"], "mistral")  # ends a turn with `eos_token`: the directory's own
    assert template.turn_end_text() == "<|end_of_text|>" and data.stop_ids(template, tok) == (tok.eod,)
    # role markers: the turn ends with a newline, then the EOD `render` appends: EOD alone
    assert data.stop_ids(data.ChatTemplate(), tok) == (tok.eod,)
    assert data.stop_ids(data.ChatTemplate(end="<|eot_id|>\n"), tok) == (tok.eod, ids["<|eot_id|>"])


def _turn_model(mcore, vocab: int, likely: dict[int, float]):
    """A GPT-2 chunk whose next-token logits are the same at every position: the final LayerNorm's gain is
    zero and its bias the first unit vector, so the (tied) output layer reads column 0 of the embedding,
    set to `likely` (every other token -10)."""
    spec = gpt2_spec(vocab=vocab, seq_length=64)
    chunk = mcore.build_gpt(spec, mcore.single_layout(), seq_length=64)
    model = mcore.unwrap(chunk)
    with torch.no_grad():
        model.decoder.final_layernorm.weight.zero_()
        model.decoder.final_layernorm.bias.zero_()
        model.decoder.final_layernorm.bias[0] = 1.0
        column = torch.full((model.embedding.word_embeddings.weight.shape[0],), -10.0)
        for token, logit in likely.items():
            column[token] = logit
        model.embedding.word_embeddings.weight[:, 0] = column
    return chunk


def test_rollouts_and_eval_generations_stop_at_the_turn_end(mcore, dirs):
    from nemoc.runtime.align import evaluate

    template, tok = _load(dirs["chatml"])
    ids = tok.special_tokens
    im_end, words = ids["<|im_end|>"], tok.tokenize(" plus is hi")
    # each step: <|im_end|> with probability 1/(1 + len(words)), else a word; never <|endoftext|>
    chunk = _turn_model(mcore, tok.vocab_size, {im_end: 2.0, **{w: 2.0 for w in words}})
    prompts = [template.prompt_ids(tok, [data.Message("user", w)]) for w in WORDS] * 2
    stops = data.stop_ids(template, tok)
    kw = dict(max_new_tokens=24, vocab=tok.vocab_size, seq_length=64, temperature=1.0)
    ours = generation.generate(chunk, prompts, eod=stops, generator=torch.Generator().manual_seed(0), **kw).tokens
    eod_only = generation.generate(chunk, prompts, eod=tok.eod, generator=torch.Generator().manual_seed(0),
                                   **kw).tokens
    assert all(c[-1] == im_end and im_end not in c[:-1] for c in ours if len(c) < 24)
    assert sum(len(c) < 24 for c in ours) >= len(prompts) - 1
    # stopping only at EOD (the old behaviour) runs past the turn end up to max_new_tokens
    assert all(len(c) == 24 for c in eod_only) and any(im_end in c[:-1] for c in eod_only)
    # GRPO's verifiers read the completion without its stop token
    from nemoc.runtime.align import grpo

    verifier = grpo.VerifierReward("exact_match", tok, template.end, stops)
    assert verifier.text(tok.tokenize("7") + [im_end]) == "7"
    assert grpo.VerifierReward("exact_match", tok, "", ()).text(tok.tokenize("7") + [im_end]) == "7<|im_end|>"
    # eval's generations (greedy: <|im_end|> is the first of the tied maxima) end at the turn end
    greedy = _turn_model(mcore, tok.vocab_size, {im_end: 3.0, words[0]: 2.9})
    (out,) = evaluate.generations(greedy, tok, template, ["Say hi."], seq_length=64, vocab=tok.vocab_size,
                                  max_new_tokens=16, temperature=None, seed=0)
    assert out["tokens"] == 1 and out["completion"] == ""


def test_exported_generation_config_lists_both_ids_and_transformers_stops_there(dirs, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from nemoc.runtime.hf import convert

    template, tok = _load(dirs["chatml"])
    ids = tok.special_tokens
    eos, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    config = convert.generation_config({"special_ids": {"eos_token_id": eos, "bos_token_id": eos}}, None,
                                       data.stop_ids(template, tok))
    assert config["eos_token_id"] == [eos, im_end]
    assert convert.generation_config({"special_ids": {"eos_token_id": eos}}, None, (eos,))["eos_token_id"] == eos
    # a model whose every next token is <|im_end|> (constant final hidden state, as above)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                       eos_token_id=eos, bos_token_id=eos))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = -10.0
        model.transformer.wte.weight[im_end, 0] = 5.0
    out = tmp_path / "hf"
    model.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    prompt = torch.tensor([template.prompt_ids(tok, [data.Message("user", "Say hi.")])])
    generated = loaded.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=eos)
    assert generated[0, prompt.shape[1]:].tolist() == [im_end]  # stopped at the turn end, not 10 tokens


def test_export_stop_ids_follow_the_trained_stages_template(dirs):
    from nemoc.runtime.align import stage

    stages = {"sft": SimpleNamespace(params={"template": {"name": "tokenizer"}}, after=()),
              "export": SimpleNamespace(params={}, after=("sft",))}
    plan = SimpleNamespace(stage=stages.__getitem__, model=SimpleNamespace(init=None), root=".")
    task = SimpleNamespace(stage=SimpleNamespace(name="export", after=("sft",)), plan=plan,
                           tokenizer=str(dirs["chatml"]))
    _, tok = _load(dirs["chatml"])
    assert stage.trained_template(task) == {"name": "tokenizer"}
    assert stage.export_stop_ids(task) == (tok.eod, tok.special_tokens["<|im_end|>"])
    # no stage rendered conversations (a base checkpoint converted, or pretrained): the source's generation
    # config stays as it is, although the tokenizer ships a chat_template
    stages["sft"] = SimpleNamespace(params={}, after=())
    assert stage.export_stop_ids(task) == ()


# ------------------------------------------------------------------ tokenized once across two gloo ranks


class _Counting:
    """A tokenizer that appends its rank to `log` on every `tokenize` call."""

    def __init__(self, tok, log: str, rank: int):
        self._tok, self._log, self._rank = tok, log, rank

    def tokenize(self, text):
        with open(self._log, "a") as f:
            f.write(f"{self._rank}\n")
        return self._tok.tokenize(text)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _task(kind: str, tokenizer: str, path: str, fmt: str, out: str):
    return SimpleNamespace(params={"template": {"name": "tokenizer"}}, tokenizer=tokenizer, output_dir=Path(out),
                           stage=SimpleNamespace(seed=3, name=kind, kind=kind, seq_length=64),
                           datasets=[{"name": "d", "path": path, "format": fmt, "split": "75,25,0"}])


def _rank(rank: int, port: int, tokenizer: str, root: str):
    import torch.distributed as dist

    from nemoc.runtime.align import grpo, kto
    from nemoc.runtime.tokenizer import load_tokenizer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        base = load_tokenizer(tokenizer)
        got = {}
        for kind, fmt, fn in (("kto", "unpaired", kto.examples_of), ("grpo", "prompt_response", grpo.queries_of)):
            tok = _Counting(base, f"{root}/{kind}.calls", rank)
            train, val = fn(_task(kind, tokenizer, f"{root}/{kind}.jsonl", fmt, f"{root}/out"), tok)
            got[kind] = [[list(vars(x).values()) for x in side] for side in (train, val)]
        Path(f"{root}/result.{rank}").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


def test_kto_and_grpo_are_tokenized_once_across_two_ranks(dirs, tmp_path):
    import torch.multiprocessing as mp

    with (tmp_path / "kto.jsonl").open("w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"Say {i}.", "completion": f"hi {i}", "label": i % 2 == 0}) + "\n")
    with (tmp_path / "grpo.jsonl").open("w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"What is {i} plus 4?", "response": str(i + 4)}) + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(dirs["chatml"]), str(tmp_path)), nprocs=2, join=True)
    for kind, per_record in (("kto", 2), ("grpo", 1)):  # KTO: prompt + completion; GRPO: the prompt
        calls = (tmp_path / f"{kind}.calls").read_text().split()
        assert set(calls) == {"0"} and len(calls) == 8 * per_record, kind  # rank 0 alone, once per record
    first, second = (json.loads((tmp_path / f"result.{r}").read_text()) for r in (0, 1))
    assert first == second
    assert [len(side) for side in first["kto"]] == [6, 2] and [len(side) for side in first["grpo"]] == [6, 2]
    _, tok = _load(dirs["chatml"])
    prompt, completion, desirable, pair = first["kto"][0][0]
    assert tok.detokenize(prompt).endswith("<|im_start|>assistant\n") and pair is None
    assert completion[-2:] == tok.tokenize("<|im_end|>\n")  # the reply with the template's turn end
