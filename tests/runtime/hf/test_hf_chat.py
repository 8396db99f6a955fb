"""Chat templates render exactly as transformers' apply_chat_template; loss on assistant turns only;
the conversation formats people fine-tune with."""

from __future__ import annotations

import pytest

from nemoc.runtime.hf import chat

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
# A template in the style of recent model cards: tojson, loop controls, namespace, raise_exception.
CUSTOM = (
    "{%- set ns = namespace(n=0) -%}{%- for m in messages -%}{%- if m['role'] == 'system' -%}{{ '<<SYS>>' + m['content'] | tojson }}"
    "{%- continue -%}{%- endif -%}{%- set ns.n = ns.n + 1 -%}{{ '\n[' ~ ns.n ~ '] ' ~ m['role'] ~ ': ' ~ m['content'] ~ eos_token }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '\n[assistant]' }}{%- endif -%}"
)


def _hf_tokenizer(directory, template):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for m in CONVERSATION for w in m["content"].split()} | {"x"})
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = template
    fast.save_pretrained(directory)
    return fast


@pytest.mark.parametrize("name", ["llama3", "chatml", "mistral", "custom"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_renders_exactly_as_transformers(tmp_path, name, generation_prompt):
    template = CUSTOM if name == "custom" else chat.BUILTIN_TEMPLATES[name]
    fast = _hf_tokenizer(tmp_path, template)
    messages = CONVERSATION[:-1] if generation_prompt else CONVERSATION
    expected = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    ours = chat.ChatTemplate.load(tmp_path).render(messages, add_generation_prompt=generation_prompt)
    assert ours == expected


def test_loss_on_assistant_turns_only():
    from tokenizers import Tokenizer, models, pre_tokenizers

    template = chat.ChatTemplate.load("chatml")
    text, spans = template.assistant_spans(CONVERSATION)
    assert [text[a:b] for a, b in spans] == ["Hello.<|im_end|>\n", "4<|im_end|>\n"]
    chars = sorted(set(text))
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    ids, mask = template.tokenize(CONVERSATION, tok.encode)
    trained = "".join(chars[i] for i, m in zip(ids, mask) if m)
    assert trained == "Hello.<|im_end|>\n4<|im_end|>\n"


def test_a_template_that_rewrites_earlier_turns_is_refused():
    odd = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(chat.ChatError, match="earlier turns"):
        chat.ChatTemplate(odd).assistant_spans([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                {"role": "user", "content": "c"}])


def test_mistral_template_raises_on_bad_alternation():
    with pytest.raises(chat.ChatError, match="alternate"):
        chat.ChatTemplate.load("mistral").render([{"role": "assistant", "content": "x"}])


def test_formats():
    openai = {"messages": CONVERSATION}
    sharegpt = {"conversations": [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "Hi there"},
                                  {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "2+2?"},
                                  {"from": "gpt", "value": "4"}]}
    assert chat.to_messages(openai) == chat.to_messages(sharegpt) == CONVERSATION
    pr = chat.to_messages({"instruction": "2+2?", "output": "4"}, columns={"instruction": "prompt", "output": "response"})
    assert pr == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    chosen, rejected = chat.to_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert chosen[-1] == {"role": "assistant", "content": "4"} and rejected[-1]["content"] == "5"
    chosen, _ = chat.to_preference({"chosen": CONVERSATION, "rejected": CONVERSATION[:-1] + [{"role": "assistant", "content": "5"}]})
    assert chosen == CONVERSATION
    with pytest.raises(chat.ChatError, match="record 7: ShareGPT turn 0"):
        chat.to_messages({"conversations": [{"from": "robot", "value": "x"}]}, where="record 7")
    with pytest.raises(chat.ChatError, match="no `messages`"):
        chat.to_messages({"text": "x"})


def test_a_directory_without_a_template_names_the_builtins(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(chat.ChatError, match="llama3, chatml, mistral"):
        chat.ChatTemplate.load(tmp_path)
