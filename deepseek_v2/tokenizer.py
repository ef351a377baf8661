"""Tokenizer: `tokenizer.json` + `tokenizer_config.json`, chat-template rendering and incremental detokenizing.

`Tokenizer` mirrors the parts of a transformers fast tokenizer the engine and server use (`encode`, `decode`,
`apply_chat_template`, special-token ids), giving the same ids and strings for the same files without
importing transformers. `IncrementalDetokenizer` turns generated ids into text deltas while streaming.
"""
import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend
from tokenizers import processors

# The chat_template of tokenizer_config.json in the DeepSeek-V2, -Chat, -Lite(-Chat) and Coder-V2
# checkpoints, byte for byte.
DEEPSEEK_V2_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# DeepSeek-Coder's fill-in-the-middle tokens (in every DeepSeek-V2 vocabulary): prefix, hole, suffix, end
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
ROLES = ("system", "user", "assistant", "tool")
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt JSON in {path}: {e}") from e


def _content(token) -> str | None:
    """A config token is a plain string, an AddedToken dict `{"content": ...}`, or null."""
    return token["content"] if isinstance(token, dict) else token


def _compile_template(source: str) -> jinja2.Template:
    """The same Jinja environment as transformers' `_compile_jinja_template`, so renderings match exactly."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _check_messages(messages, roles: tuple[str, ...] = ROLES) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in roles:
            raise ValueError(f"messages[{i}]['role'] must be one of {roles}, got {m.get('role')!r}")
        if m.get("tool_calls") and "tool" not in roles:
            raise ValueError(f"messages[{i}] has tool_calls, which this chat template cannot write")
        if not isinstance(m.get("content"), str) and not (m.get("content") is None and m.get("tool_calls")):
            raise ValueError(f"messages[{i}]['content'] must be a string, got {type(m.get('content')).__name__}")


def _cut_after_final_message(text: str, final: str) -> str:
    """The rendered chat up to the end of its final message's content (as transformers cuts it: a
    template may strip the content's outer spaces)."""
    if not final.strip():
        raise ValueError("continue_final_message needs a last message with content to continue")
    at = text.rfind(final.strip())
    if at < 0:
        raise ValueError("continue_final_message: the chat template does not write the last message's content")
    kept = final.lstrip()
    return text[:at + (len(kept) if text[at:at + len(kept)] == kept else len(final.strip()))]


class Tokenizer:
    """A byte-level BPE tokenizer with the transformers names: encode, decode, apply_chat_template."""

    def __init__(self, backend: _Backend, config: dict):
        self._tok = backend
        self.config = config
        for name in _SPECIAL_NAMES:
            setattr(self, name, _content(config.get(name)))
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.chat_template = config.get("chat_template") or DEEPSEEK_V2_CHAT_TEMPLATE
        self._template = None
        # Like transformers: special tokens named in the config but missing from tokenizer.json get added.
        missing = [t for t in {getattr(self, n) for n in _SPECIAL_NAMES} - {None} if backend.token_to_id(t) is None]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(missing)])
        # Like transformers: explicit add_bos/eos_token flags (or no post-processor) rebuild the BOS/EOS template.
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            self._set_post_processor()

    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        """Load `tokenizer.json` and `tokenizer_config.json` from a checkpoint directory."""
        tokenizer_json = os.path.join(path, "tokenizer.json")
        raw = _read_json(tokenizer_json)
        try:
            backend = _Backend.from_str(json.dumps(raw))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed pipeline
            raise ValueError(f"invalid tokenizer in {tokenizer_json}: {e}") from e
        return cls(backend, _read_json(os.path.join(path, "tokenizer_config.json")))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (with the chat template) into a directory,
        so that a checkpoint saved beside them can be loaded and served on its own."""
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, "tokenizer.json"))
        config = {**self.config, "chat_template": self.chat_template}
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)

    def _set_post_processor(self):
        bos = self.bos_token if self.add_bos_token and self.bos_token else None
        eos = self.eos_token if self.add_eos_token and self.eos_token else None
        single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
        pair = " ".join([single] + [f"{bos}:1"] * bool(bos) + ["$B:1"] + [f"{eos}:1"] * bool(eos))
        special = [(t, self._tok.token_to_id(t)) for t in dict.fromkeys([bos, eos]) if t]
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    def backend_json(self) -> str:
        """The whole tokenizer (tokenizer.json plus the tokens the config added) as JSON."""
        return self._tok.to_str()

    @property
    def has_fill_in_middle(self) -> bool:
        return all(self._tok.token_to_id(t) is not None for t in (FIM_BEGIN, FIM_HOLE, FIM_END))

    def fill_in_middle(self, prefix: str, suffix: str) -> str:
        """The prompt (to encode with the BOS) asking for the text between prefix and suffix, in
        DeepSeek-Coder-V2's format: the model writes the middle, then EOS."""
        if not self.has_fill_in_middle:
            raise ValueError(f"this tokenizer has no fill-in-the-middle tokens ({FIM_BEGIN}, {FIM_HOLE}, {FIM_END})")
        return f"{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}"

    # --- vocabulary -----------------------------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.pad_token) if self.pad_token else None

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (transformers' `vocab_size`)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted({i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id) if i is not None})

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tok.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    # --- text <-> ids ---------------------------------------------------------------------------------------------
    # The batch calls of `tokenizers` release the GIL and the single ones do not: a long input goes
    # through them so that a thread tokenizing it (the server's) does not stall the other threads.
    # Short ones keep the single calls: giving the GIL back and waiting for it costs more than they do.
    _RELEASE_GIL_FROM = 4096  # characters or ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens the BOS (and EOS) the config asks for are added."""
        if len(text) >= self._RELEASE_GIL_FROM:
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_many(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, in one batch call (in parallel, without the GIL)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        if len(ids) >= self._RELEASE_GIL_FROM:
            return self._tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True,
                            tools: list[dict] | None = None, continue_final_message: bool = False,
                            **extra_template_vars):
        """Render `messages` with the chat template; ids (tokenize=True) or the rendered string.
        `tools` (OpenAI's function definitions) go to a template that writes them; for one that does
        not (the released DeepSeek-V2.5 template) they are described at the end of the system prompt.
        `continue_final_message` (transformers' meaning): the rendering ends where the last message's
        content does, without what the template closes it with (an assistant's EOS), so that generation
        continues that message.

        The template writes the BOS itself, so the rendered text is tokenized without special tokens.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set: the first "
                             "continues the last message, the second starts a new one")
        # a template without tool calls would drop tool messages without a word: refuse them
        _check_messages(messages, ROLES if "tool_calls" in self.chat_template else ROLES[:3])
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        variables = {n: getattr(self, n) for n in _SPECIAL_NAMES if getattr(self, n) is not None}
        variables.update(extra_template_vars)
        messages = [dict(m) for m in messages]
        if tools and "tools" not in self.chat_template:
            from .tool_calls import tools_prompt
            if messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": ""})
            messages[0]["content"] += tools_prompt(tools)
        text = self._template.render(messages=messages, tools=tools or None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **variables)
        if continue_final_message:
            text = _cut_after_final_message(text, messages[-1].get("content") or "")
        return self.encode(text, add_special_tokens=False) if tokenize else text


class IncrementalDetokenizer:
    """Streams generated ids as text deltas, never splitting a UTF-8 character.

    A byte-level BPE token can end halfway through a character, which decodes to a trailing U+FFFD. Like
    vLLM, each step decodes only a window `ids[prefix_offset:]` that starts at a clean character boundary,
    and subtracts the text already emitted from it. The window moves forward whenever the decoded text ends
    cleanly, so a step costs a few tokens of decoding. The deltas of `add` plus `flush` concatenate to
    `tokenizer.decode(all_ids, skip_special_tokens)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: a clean character boundary
        self.read_offset = 0  # ids before this were fully emitted
        self.emitted = 0  # characters of the window's text already emitted

    def _decode(self, start: int, end: int | None = None) -> str:
        # the window is a short list of Python ints: straight to `tokenizers`, without Tokenizer.decode's
        # conversion of every id (this runs twice for every generated token)
        return self.tokenizer._tok.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids) -> str:
        """Append one step's token id(s); return the newly completed text (possibly "")."""
        self.ids.extend([token_ids] if isinstance(token_ids, int) else [int(t) for t in token_ids])
        text = self._decode(self.prefix_offset)
        # A trailing U+FFFD may be an incomplete character that the next token completes: hold it back.
        incomplete = text.endswith("\ufffd")
        stable = len(text) - incomplete
        delta = text[self.emitted:stable] if stable > self.emitted else ""
        self.emitted = max(self.emitted, stable)
        if not incomplete:
            # Clean end: slide the window so it starts at the previous clean boundary (vLLM's prefix offset);
            # re-decoding that prefix keeps context for decoders that strip a leading space.
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.emitted = len(self._decode(self.prefix_offset))
        return delta

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete or invalid trailing sequence)."""
        text = self._decode(self.prefix_offset)
        delta, self.emitted = text[self.emitted:], len(text)
        return delta
