"""A checkpoint that can call tools, for the tests and the documented examples: the shipped model's
weights and tokenizer, plus DeepSeek-V2.5's role and tool-call special tokens (ids 4000 and up, rows the
model has but the shipped tokenizer leaves unused) and a chat template in the V2.5 format. The model was
never trained on tools: with tool_choice "required" or a named function the grammar makes its calls."""

from __future__ import annotations

import json
import os
import shutil

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from deepseek_v2.config import DEFAULT_MODEL
from deepseek_v2.tool_calls import TOOL_TOKENS

ROLE_TOKENS = ("<｜User｜>", "<｜Assistant｜>")
# DeepSeek-V2.5's template: the system prompt first, <｜User｜> / <｜Assistant｜> turns, tool calls and tool
# outputs between their special tokens; the calls block is closed after the last call (as in vLLM's
# DeepSeek tool template). Like the released template it does not write `tools`: the tokenizer adds
# them to the system prompt.
V25_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- set ns.is_tool = false -%}{%- set ns.is_output_first = true -%}"
    "{{ '<｜Assistant｜>' + (message['content'] or '') + '<｜tool▁calls▁begin｜>' }}"
    "{%- for tool in message['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n```json\\n'"
    " + tool['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}{%- endfor %}"
    "{{ '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- set ns.is_tool = false -%}{%- else %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{ '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content']"
    " + '<｜tool▁output▁end｜>' }}{%- set ns.is_output_first = false %}"
    "{%- else %}{{ '\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}{%- endif %}"
    "{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def make_tool_checkpoint(path: str | os.PathLike) -> str:
    """Write the checkpoint into the directory `path` (the weights are linked, not copied)."""
    os.makedirs(path, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(DEFAULT_MODEL, name), path)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        os.symlink(os.path.join(DEFAULT_MODEL, "model.safetensors"), weights)
    backend = Backend.from_file(os.path.join(DEFAULT_MODEL, "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ROLE_TOKENS + TOOL_TOKENS])
    backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(DEFAULT_MODEL, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["chat_template"] = V25_TEMPLATE
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return str(path)
