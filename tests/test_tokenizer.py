# Run: python -m pytest -q tests/test_tokenizer.py   (CPU, about a second; checks against transformers' AutoTokenizer)
import json
import os
import re
import shutil

import pytest

from deepseek_v2.tokenizer import DEEPSEEK_V2_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

MODEL_DIR = os.path.join(os.path.dirname(__file__), "..", "deepseek_v2", "default_model")
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
FIM = ["<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"]

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for i in range(10):\n\tprint(f'{i:03d}', end='\\r\\n')",
    "naïve café, Straße, Ελληνικά, русский",
    "深度求索 DeepSeek-V2 是一个混合专家语言模型。日本語のテキスト、한국어 텍스트",
    "emoji: 😀👍🏽👨‍👩‍👧‍👦 🇯🇵 and math: ∑ ∫ √ ≤ ≠",
    f"{BOS}already has a bos{EOS} and an eos",
    "<｜fim▁begin｜>def f():\n<｜fim▁hole｜>\n<｜fim▁end｜>",
    "numbers 1234567890 3.14159 -2e-10 0xFF",
    "\n\n\n\t \u00a0\u200b zero-width and nbsp",
]

CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "写一首诗 😀"},
        {"role": "assistant", "content": "def f():\n    pass"},
        {"role": "user", "content": "again"},
    ],
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def hf():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


def test_special_tokens_and_sizes(tok, hf):
    assert (tok.bos_token, tok.eos_token) == (BOS, EOS)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                      hf.pad_token_id)
    assert tok.vocab_size == hf.vocab_size == 4000
    assert len(tok) == len(hf)
    assert tok.convert_tokens_to_ids(FIM) == hf.convert_tokens_to_ids(FIM) == [2, 3, 4]
    assert tok.convert_ids_to_tokens([0, 1, 2, 50]) == hf.convert_ids_to_tokens([0, 1, 2, 50])
    assert tok.convert_ids_to_tokens(1) == EOS
    assert tok.convert_ids_to_tokens([0, 2, 50, 1], skip_special_tokens=True) == hf.convert_ids_to_tokens(
        [0, 2, 50, 1], skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 + text.count(BOS)  # exactly one added
    assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids) == BOS + text
    assert tok.decode(ids, skip_special_tokens=True) == re.sub("|".join(map(re.escape, [BOS, EOS, *FIM])), "", text)


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(tok, hf, messages, add_generation_prompt):
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    hf_ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)["input_ids"]
    assert ids == hf_ids
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert text.endswith("Assistant:") == add_generation_prompt  # no trailing space, as the official template writes it


@pytest.mark.parametrize("final", ["The answer is", "The answer is ", "  padded  ", "写一首诗 😀"])
def test_continue_final_message_matches_transformers(tok, hf, final):
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": final}]
    text = tok.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert text == hf.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert text.endswith(final) and tok.eos_token not in text  # this template keeps the spaces
    assert tok.apply_chat_template(messages, continue_final_message=True) == hf.apply_chat_template(
        messages, continue_final_message=True)["input_ids"]
    with pytest.raises(ValueError, match="add_generation_prompt"):
        tok.apply_chat_template(messages, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ValueError, match="content"):
        tok.apply_chat_template(messages[:1] + [{"role": "assistant", "content": " "}], continue_final_message=True)


def test_checkpoint_template_is_the_spec_template(tok):
    assert tok.chat_template == DEEPSEEK_V2_CHAT_TEMPLATE


def test_default_template_when_config_has_none(tmp_path):
    shutil.copy(os.path.join(MODEL_DIR, "tokenizer.json"), tmp_path)
    with open(os.path.join(MODEL_DIR, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"{BOS}sys\n\nUser: u1\n\nAssistant: a1{EOS}User: u2\n\nAssistant:"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == tok.encode(text, add_special_tokens=False) and ids.count(tok.bos_token_id) == 1


def test_extra_template_vars_override(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, bos_token="[B]")
    assert text == "[B]User: x\n\n"


@pytest.mark.parametrize("messages", [
    [],
    "hello",
    [{"role": "user"}],
    [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": ["a", "b"]}],
    [{"role": "user", "content": None}],
    ["user: hi"],
])
def test_bad_messages_raise(tok, messages):
    with pytest.raises(ValueError):
        tok.apply_chat_template(messages)


@pytest.mark.parametrize("text", TEXTS + ["".join(TEXTS), "末尾の漢字" * 20, "🙂" * 30])
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_incremental_detokenizer(tok, text, skip_special_tokens):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert all("\ufffd" not in d for d in deltas)
    assert detok.prefix_offset >= len(ids) - 8  # the decode window stays small


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-symbol map, the alphabet of the ByteLevel pre-tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    return {**{b: chr(b) for b in bs}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def _byte_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte (the 256 base symbols), so every multi-byte character is cut into pieces."""
    symbols = _bytes_to_unicode()
    return tok.convert_tokens_to_ids([symbols[b] for b in text.encode("utf-8")])


def test_incremental_detokenizer_splits_multibyte_characters(tok):
    ids = _byte_ids(tok, "é東😀!")
    assert None not in ids and tok.decode(ids) == "é東😀!"
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids] == ["", "é", "", "", "東", "", "", "", "😀", "!"]
    assert detok.flush() == ""


def test_incremental_detokenizer_token_straddles_characters(tok):
    # Token b'"\xe2\x80' ends with the first two bytes of '…' (e2 80 a6): its '"' is emitted at once, the rest
    # when b'\xa6"' completes the character.
    symbols = _bytes_to_unicode()
    straddle = tok.convert_tokens_to_ids(["".join(symbols[b] for b in s) for s in (b'"\xe2\x80', b'\xa6"')])
    if None in straddle:
        pytest.skip("vocab has no character-straddling tokens")
    ids = tok.encode("x", add_special_tokens=False) + straddle
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids] == ["x", '"', '…"'] and tok.decode(ids) == 'x"…"'


def test_incremental_detokenizer_flushes_incomplete_tail(tok):
    ids = _byte_ids(tok, "ok東")[:-1]  # generation stopped mid-character
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert deltas[-1] == "" and "".join(deltas) == "ok"
    tail = detok.flush()
    assert "".join(deltas) + tail == tok.decode(ids) and tail == "\ufffd"


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
    shutil.copy(os.path.join(MODEL_DIR, "tokenizer.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(str(tmp_path))


def test_corrupt_json(tmp_path):
    shutil.copy(os.path.join(MODEL_DIR, "tokenizer.json"), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"model": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))


def test_save_pretrained_round_trip(tmp_path):
    """A saved tokenizer (with tokens added on top of tokenizer.json and its own chat template) loads
    back the same, so a model saved beside it can be served on its own."""
    from tool_model import make_tool_checkpoint
    original = Tokenizer.from_pretrained(make_tool_checkpoint(tmp_path / "src"))
    original.save_pretrained(tmp_path / "out")
    again = Tokenizer.from_pretrained(tmp_path / "out")
    text = "User: héllo <｜tool▁calls▁begin｜> 🙂"
    assert again.encode(text) == original.encode(text) and len(again) == len(original)
    messages = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (again.bos_token, again.eos_token, again.chat_template) == \
        (original.bos_token, original.eos_token, original.chat_template)
