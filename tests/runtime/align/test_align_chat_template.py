"""The stage's chat template at run time (runtime/align/data.py `template_for`): a tokenizer directory's
own jinja template (a Qwen2.5-style ChatML template with its default system prompt, a Llama 3 template
with BOS) tokenizes to exactly the ids transformers' `apply_chat_template` gives, loss on the assistant
turns only; OpenAI messages, ShareGPT, prompt/response and preference records all go through it; SFT
rows are consumed in a seeded shuffled order; samples are tokenized once for all ranks."""

from __future__ import annotations

import json

import pytest

from nemoc.runtime.align import data
from nemoc.runtime.align.data import Message
from nemoc.runtime.hf import chat, datasets

# Qwen2.5-Instruct's chat template (tokenizer_config.json), the tool-call branches shortened.
QWEN25 = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- \"\\n\\n# Tools\\n\\n<tools>\" }}{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools><|im_end|>\\n\" }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == \"assistant\" %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CONVERSATION = [
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
    {"role": "user", "content": "And 6 plus 2?"},
    {"role": "assistant", "content": "6 plus 2 is 8."},
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Two Hugging Face tokenizer directories (a byte-level BPE trained here, saved by transformers): a
    Qwen-style one with its own chat template and eos <|im_end|>, a Llama 3-style one without a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [m["content"] for m in CONVERSATION] * 20 + ["You are Qwen, created by Alibaba Cloud.", "system user"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root = tmp_path_factory.mktemp("tokenizers")
    qwen = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    qwen.chat_template = QWEN25
    qwen.save_pretrained(root / "qwen")
    llama = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    llama.save_pretrained(root / "llama")
    return {"qwen": (root / "qwen", qwen), "llama": (root / "llama", llama)}


def _ours(directory, name):
    from nemoc.runtime.tokenizer import load_tokenizer

    return data.template_for({"template": {"name": name}}, str(directory)), load_tokenizer(str(directory))


def _msgs(conversation):
    return [Message(m["role"], m["content"]) for m in conversation]


@pytest.mark.parametrize("which,name", [("qwen", "tokenizer"), ("llama", "llama3"), ("qwen", "chatml"),
                                        ("qwen", "mistral")])
def test_ids_equal_apply_chat_template_and_loss_is_on_assistant_turns(tokenizer_dirs, which, name):
    directory, fast = tokenizer_dirs[which]
    template, tok = _ours(directory, name)
    given = None if name == "tokenizer" else chat.BUILTIN_TEMPLATES[name]  # a named built-in, as transformers takes it
    expected = fast.apply_chat_template(CONVERSATION, chat_template=given, tokenize=True, return_dict=True)["input_ids"]
    ids, weights = template.render(tok, _msgs(CONVERSATION))
    assert ids == list(expected)
    trained = tok.detokenize([i for i, w in zip(ids, weights) if w])
    turn = {"tokenizer": "{}<|im_end|>\n", "chatml": "{}<|im_end|>\n", "llama3": "{}<|eot_id|>",
            "mistral": " {}" + fast.eos_token}[name]  # each assistant turn with its end-of-turn marker
    assert trained == turn.format("3 plus 4 is 7.") + turn.format("6 plus 2 is 8.")
    if name == "tokenizer":  # the template's own default system prompt is rendered (not trained on)
        assert tok.detokenize(ids).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    if name == "llama3":  # BOS per template, once
        assert ids[0] == fast.convert_tokens_to_ids("<|begin_of_text|>") and ids.count(ids[0]) == 1


def test_prompt_and_reply_ids_as_transformers_renders_them(tokenizer_dirs):
    directory, fast = tokenizer_dirs["qwen"]
    template, tok = _ours(directory, "tokenizer")
    prompt = _msgs(CONVERSATION[:1])
    expected_prompt = fast.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, tokenize=False)
    assert tok.detokenize(template.prompt_ids(tok, prompt)) == expected_prompt
    reply = template.reply_ids(tok, "3 plus 4 is 7.", prompt)
    assert tok.detokenize(template.prompt_ids(tok, prompt) + reply) == fast.apply_chat_template(
        CONVERSATION[:2], tokenize=False)
    assert template.end == "<|im_end|>"  # what GRPO's verifiers strip: the template's eos


def test_every_record_format_goes_through_the_template(tokenizer_dirs, tmp_path):
    directory, fast = tokenizer_dirs["qwen"]
    template, tok = _ours(directory, "tokenizer")
    sharegpt = {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                  for m in CONVERSATION]}
    records = {"openai.jsonl": ("chat", {"messages": CONVERSATION}), "sharegpt.jsonl": ("chat", sharegpt),
               "pr.jsonl": ("prompt_response", {"prompt": CONVERSATION[0]["content"],
                                                "response": CONVERSATION[1]["content"]})}
    for name, (fmt, record) in records.items():
        (tmp_path / name).write_text(json.dumps(record) + "\n")
        (conv,) = data.read_sft(tmp_path / name, fmt)
        messages = [{"role": m.role, "content": m.content} for m in conv.messages]
        ids, _ = template.render(tok, conv.messages)
        expected = fast.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == list(expected), name
    assert [m.content for m in data.read_sft(tmp_path / "sharegpt.jsonl", "chat")[0].messages] == \
        [m["content"] for m in CONVERSATION]
    (tmp_path / "prefs.jsonl").write_text(json.dumps({"prompt": "What is 3 plus 4?", "chosen": "3 plus 4 is 7.",
                                                      "rejected": "3 plus 4 is 8."}) + "\n")
    (pref,) = data.read_preferences(tmp_path / "prefs.jsonl")
    for reply in (pref.chosen, pref.rejected):
        full = template.prompt_ids(tok, pref.prompt) + template.reply_ids(tok, reply, pref.prompt)
        assert tok.detokenize(full) == fast.apply_chat_template(
            [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": reply}], tokenize=False)


def test_markers_stay_the_default_without_a_jinja_template():
    template = data.template_for({"template": {"name": "markers", "user": "U: ", "tokenizer": None}}, None)
    assert isinstance(template, data.ChatTemplate) and template.user == "U: "
    assert isinstance(data.template_for(None, None), data.ChatTemplate)
    with pytest.raises(data.DataError, match="not a Hugging Face tokenizer directory"):
        data.template_for({"template": {"name": "tokenizer"}}, "tokenizer.json")


def test_sft_rows_are_consumed_in_a_seeded_shuffled_order():
    from nemoc.runtime.align import sft

    samples = [([1] * n, [0] + [1] * (n - 1)) for n in range(2, 40)]
    rows = sft.pack(samples, seq_length=48, enabled=True)
    lengths = [sum(len(s[0]) for s in row) for row in rows]
    first = [len(row[0][0]) for row in rows]
    assert first == sorted(first, reverse=True)  # first-fit-decreasing: longest first
    a, b, c = sft.shuffled(rows, 7), sft.shuffled(rows, 7), sft.shuffled(rows, 8)
    assert a == b and a != c  # seeded
    assert sorted(map(id, a)) == sorted(map(id, rows)) and [len(r[0][0]) for r in a] != first  # a permutation
    assert sum(lengths) == sum(len(s[0]) for s in samples)
    unpacked = sft.shuffled(sft.pack(samples, 48, enabled=False), 7)
    assert [len(r[0][0]) for r in unpacked] != sorted(len(s[0]) for s in samples)


def _rank(rank: int, world: int, port: int, cache: str, counter: str, out: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        def build():
            with open(counter, "a") as f:
                f.write(f"{rank}\n")
            yield from ({"ids": [i, i + 1], "w": [0, 1]} for i in range(50))

        samples = datasets.tokenized_cache(cache, "k", build, writer=rank == 0, wait=dist.barrier)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(samples, f)
    finally:
        dist.destroy_process_group()


def test_ranks_share_one_tokenized_cache(tmp_path):
    """Two gloo ranks: rank 0 tokenizes once and writes the cache; rank 1 waits and reads it."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    counter, out = tmp_path / "builds", tmp_path / "samples"
    mp.spawn(_rank, args=(2, port, str(tmp_path / "cache"), str(counter), str(out)), nprocs=2, join=True)
    assert counter.read_text().split() == ["0"]  # tokenized once, by rank 0
    first, second = (json.loads((tmp_path / f"samples.{r}").read_text()) for r in (0, 1))
    assert first == second and len(first) == 50


def test_the_cache_key_follows_data_template_and_tokenizer(tokenizer_dirs, tmp_path):
    directory, _ = tokenizer_dirs["qwen"]
    (tmp_path / "a.jsonl").write_text('{"prompt": "x", "response": "y"}\n')
    key = datasets.content_key("sft", 1, "t", datasets.tokenizer_digest(str(directory)),
                               datasets.file_digest(tmp_path / "a.jsonl"))
    assert key == datasets.content_key("sft", 1, "t", datasets.tokenizer_digest(str(directory)),
                                       datasets.file_digest(tmp_path / "a.jsonl"))
    (tmp_path / "a.jsonl").write_text('{"prompt": "x", "response": "z"}\n')
    changed = [datasets.content_key("sft", 1, "t", datasets.tokenizer_digest(str(directory)),
                                    datasets.file_digest(tmp_path / "a.jsonl")),
               datasets.content_key("sft", 2, "t", datasets.tokenizer_digest(str(directory)), "d"),
               datasets.content_key("sft", 1, "u", datasets.tokenizer_digest(str(directory)), "d")]
    assert key not in changed and len(set(changed)) == 3
    markers = data.ChatTemplate().fingerprint()
    assert markers != data.ChatTemplate(user="U: ").fingerprint()


def test_preparation_validates_sharegpt_and_prompt_response_chat_records():
    """`prepare:<data>` validates every chat record before any stage runs: ShareGPT turns are checked as
    the messages they become (an unknown speaker is named), prompt/response as one exchange."""
    from nemoc.runtime.data_prep import DataError, record_texts

    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert record_texts(sharegpt, "chat", "text", "d.jsonl", 3) == ["hi", "yo"]
    assert record_texts({"prompt": "hi", "response": "yo"}, "chat", "text", "d.jsonl", 4) == ["hi", "yo"]
    with pytest.raises(DataError, match=r"d.jsonl:5: messages\[0\].role 'robot' is not one of"):
        record_texts({"conversations": [{"from": "robot", "value": "x"}]}, "chat", "text", "d.jsonl", 5)
    with pytest.raises(DataError, match=r"d.jsonl:6: field 'messages' must be"):
        record_texts({"text": "x"}, "chat", "text", "d.jsonl", 6)


def _bad_rank(rank: int, world: int, port: int, cache: str, out: str):
    from datetime import timedelta

    import torch.distributed as dist

    # a barrier left waiting fails the test after a minute instead of hanging it for gloo's 30
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        def build():
            raise data.DataError("chat.jsonl:3: field 'messages' must be a non-empty list")
            yield  # a generator, as the stages' builders

        try:
            datasets.tokenized_cache(cache, "k", build, writer=rank == 0, wait=dist.barrier)
        except data.DataError as exc:
            with open(f"{out}.{rank}", "w") as f:
                f.write(str(exc))
    finally:
        dist.destroy_process_group()


def test_a_bad_record_stops_every_rank_with_its_message(tmp_path):
    """Rank 0's tokenization fails on a record: the other ranks are not left at the barrier, each
    reports the same file:line."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_bad_rank, args=(2, port, str(tmp_path / "cache"), str(tmp_path / "err")), nprocs=2, join=True)
    for r in (0, 1):
        assert (tmp_path / f"err.{r}").read_text().startswith("chat.jsonl:3:")
