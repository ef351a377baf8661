"""Tool calls in the DeepSeek-V2.5 / DeepSeek-Coder-V2-0724 chat format.

The model writes its calls after any content, with special tokens around each part:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>

and reads tool results as `<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>...<｜tool▁output▁end｜>...
<｜tool▁outputs▁end｜>` (the checkpoint's chat template writes those). This module holds the format:
whether a tokenizer has it (`supports_tools`), the parser that turns generated text into OpenAI
tool calls, whole or as stream deltas (`ToolCallParser`), and the grammar that makes a model call a
tool with arguments that follow its schema (`tool_grammar`, for tool_choice "required" or a name).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOL_TOKENS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN,
               OUTPUT_END)
ARGS_OPEN, ARGS_CLOSE = "\n```json\n", "\n```"


def supports_tools(tokenizer) -> bool:
    """Whether a checkpoint can call tools: its vocabulary has the tool tokens and its chat template
    writes tool calls (DeepSeek-V2.5 and Coder-V2-0724 do; V2-Chat does not)."""
    return (all(tokenizer.convert_tokens_to_ids(t) is not None for t in TOOL_TOKENS)
            and "tool_calls" in tokenizer.chat_template)


def tools_prompt(tools: list[dict]) -> str:
    """The tools described for a template that does not write them itself (the released V2.5
    template has no `tools`): the text vLLM's DeepSeek tool template puts in the system prompt."""
    lines = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>{lines}\n</tools>\n\n"
            f"For function call returns, you should first print {CALLS_BEGIN}"
            "For each function call, you should return object like:\n"
            f"{CALL_BEGIN}function{SEP}<function_name>{ARGS_OPEN}<function_arguments_in_json_format>{ARGS_CLOSE}"
            f"{CALL_END}At the end of function call returns, you should print {CALLS_END}<｜end▁of▁sentence｜>")


def tool_grammar(tokenizer, tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's, special tokens by id) of a tool-call block whose arguments
    follow the function's `parameters` schema: one call of `name`, or one or more (one without
    `parallel`) calls of any of `tools`."""
    def lark_string(text: str) -> str:  # a Lark literal: llguidance reads them as JSON strings
        return json.dumps(text, ensure_ascii=False)

    tok = {t: f"<[{tokenizer.convert_tokens_to_ids(t)}]>" for t in (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)}
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    rules = []
    for i, f in enumerate(functions):
        # compact JSON, as in structured outputs: no free whitespace for a model to run on in
        schema = json.dumps({**(f.get("parameters") or {"type": "object"}), "x-guidance": {"whitespace_flexible": False}},
                            ensure_ascii=False)
        rules.append(f"call_{i}: {tok[CALL_BEGIN]} \"function\" {tok[SEP]} {lark_string(f['name'] + ARGS_OPEN)} "
                     f"args_{i} {lark_string(ARGS_CLOSE)} {tok[CALL_END]}\nargs_{i}: %json {schema}")
    calls = "call" if name is not None or not parallel else 'call ("\\n" call)*'
    return "\n".join([f"start: {tok[CALLS_BEGIN]} {calls} {tok[CALLS_END]}",
                      "call: " + " | ".join(f"call_{i}" for i in range(len(functions))), *rules])


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as the model wrote it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ToolCallDelta:
    """A piece of a streamed tool call, as OpenAI streams them: the first of each call carries its
    index, id and name; the following ones pieces of its arguments."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


class ToolCallParser:
    """Splits generated text (decoded with its special tokens) into content and tool calls, as it
    streams: `feed(delta)` returns (content, tool-call deltas) for what can be told apart so far,
    holding back text that may be the start of a marker; `finish()` flushes. Text that breaks the
    format ends the parsing: it and everything after it is content. `parse(text)` is the
    non-streaming form, and falls back to the whole text as content if any call is malformed."""

    def __init__(self):
        self.buffer = ""  # text not handed out yet
        self.state = "content"  # content, calls (between calls), name, args, done, broken
        self.calls: list[ToolCall] = []
        self.broken = False

    def _expect(self, marker: str) -> bool | None:
        """Whether the buffer starts with marker (consumed); None: too short to tell."""
        if self.buffer.startswith(marker):
            self.buffer = self.buffer[len(marker):]
            return True
        return None if marker.startswith(self.buffer) else False

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self.buffer += text
        content, deltas = "", []
        while self.buffer:
            if self.state in ("content", "broken"):
                at = self.buffer.find(CALLS_BEGIN) if self.state == "content" else -1
                if at == -1:
                    keep = held_prefix(self.buffer, CALLS_BEGIN) if self.state == "content" else 0
                    content, self.buffer = content + self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                    break
                content, self.buffer, self.state = content + self.buffer[:at], self.buffer[at + len(CALLS_BEGIN):], "calls"
            elif self.state == "calls":
                if self.calls and self.buffer.startswith("\n"):  # calls after the first follow a newline
                    self.buffer = self.buffer[1:]
                    continue
                begin = self._expect(CALL_BEGIN + "function" + SEP)
                if begin:
                    self.state = "name"
                    continue
                end = self._expect(CALLS_END) if self.calls else False
                if end:
                    self.state = "done"
                elif begin is None or end is None:
                    break
                else:
                    self.state = "broken"
            elif self.state == "name":
                at = self.buffer.find("\n")  # a name has no newline: the arguments' opening follows it
                if at == -1 or ARGS_OPEN.startswith(self.buffer[at:]):
                    if len(self.buffer) > 256:
                        self.state = "broken"
                        continue
                    break
                if not self.buffer.startswith(ARGS_OPEN, at) or at == 0:
                    self.state = "broken"
                    continue
                call = ToolCall(self.buffer[:at], "")
                self.calls.append(call)
                deltas.append(ToolCallDelta(len(self.calls) - 1, id=call.id, name=call.name))
                self.buffer, self.state = self.buffer[at + len(ARGS_OPEN):], "args"
            elif self.state == "args":
                close = ARGS_CLOSE + CALL_END
                at = self.buffer.find(close)
                end = at if at != -1 else len(self.buffer) - held_prefix(self.buffer, close)
                piece = self.buffer[:end]
                if piece:
                    self.calls[-1].arguments += piece
                    deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=piece))
                self.buffer = self.buffer[end:]
                if at == -1:
                    break
                self.buffer, self.state = self.buffer[len(close):], "calls"
            else:  # done: what follows the block is not expected; keep it as content
                content, self.buffer = content + self.buffer, ""
        if self.state == "broken":
            self.broken = True
        return content, deltas

    def finish(self) -> str:
        """The text still held back, as content; marks the parse broken if it ended inside the block."""
        rest, self.buffer = self.buffer, ""
        if self.state not in ("content", "done"):
            self.broken = True
        return rest

    @classmethod
    def parse(cls, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content or None, calls) of a whole output; (text, []) when the calls are malformed."""
        parser = cls()
        content, _ = parser.feed(text)
        content += parser.finish()
        if not parser.calls or parser.broken or not all(is_json(c.arguments) for c in parser.calls):
            return text, []
        return content or None, parser.calls


def held_prefix(text: str, marker: str) -> int:
    """How many characters at the end of text could start marker (to hold back while streaming)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False
