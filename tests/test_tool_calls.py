# Run: python -m pytest -q tests/test_tool_calls.py   (starts a server on a checkpoint with tool tokens)
"""Tool calling in the DeepSeek-V2.5 format: the parser on recorded outputs (one call, several, split
across stream chunks at every size, malformed ones falling back to content), the chat template's round
trip, and requests through the official `openai` client to a server whose checkpoint has the tool
tokens (tests/tool_model.py): named and required tool_choice force parseable calls, streamed as
OpenAI streams them; a conversation with tool results goes on."""

from __future__ import annotations

import json

import httpx
import pytest

from deepseek_v2.tokenizer import Tokenizer
from deepseek_v2.tool_calls import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, OUTPUT_BEGIN, OUTPUTS_END, SEP,
                                    ToolCallParser, supports_tools)
from server_process import start_server, stop_server
from tool_model import make_tool_checkpoint

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


def call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


ONE = "Let me look." + CALLS_BEGIN + call("get_weather", '{"city": "Paris", "unit": "c"}') + CALLS_END
SEVERAL = CALLS_BEGIN + call("get_weather", '{"city": "Oslo"}') + "\n" + call("add", '{"a": 1, "b": [2, "}"]}') \
    + "\n" + call("now", "{}") + CALLS_END
MALFORMED = [
    "Just text, no calls.",
    "Hi" + CALLS_BEGIN + "not a call",
    CALLS_BEGIN + call("f", '{"a": 1'),  # arguments that are not JSON
    CALLS_BEGIN + f"{CALL_BEGIN}function{SEP}f\n```json\n{{}}",  # cut off (max_tokens)
    CALLS_BEGIN + f"{CALL_BEGIN}function{SEP}\n```json\n{{}}\n```{CALL_END}{CALLS_END}",  # no name
]


def test_parser_one_and_several_calls():
    content, calls = ToolCallParser.parse(ONE)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "unit": "c"})]
    content, calls = ToolCallParser.parse(SEVERAL)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": [2, "}"]}), ("now", {})]
    assert len({c.id for c in calls}) == 3


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 1000])
def test_parser_streams_arguments_in_pieces(size):
    parser, content, pieces = ToolCallParser(), "", []
    for i in range(0, len(SEVERAL), size):
        text, deltas = parser.feed(SEVERAL[i:i + size])
        content += text
        pieces += deltas
    content += parser.finish()
    assert content == "" and not parser.broken
    starts = [d for d in pieces if d.name is not None]
    assert [(d.index, d.name) for d in starts] == [(0, "get_weather"), (1, "add"), (2, "now")]
    args = ["".join(d.arguments for d in pieces if d.index == k) for k in range(3)]
    assert args == ['{"city": "Oslo"}', '{"a": 1, "b": [2, "}"]}', "{}"]
    if size < 8:
        assert sum(1 for d in pieces if d.index == 1 and d.arguments) > 1  # the arguments came in pieces


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_output_falls_back_to_content(text):
    assert ToolCallParser.parse(text) == (text, [])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tool_checkpoint(tmp_path_factory.mktemp("tool-model"))


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                        "unit": {"enum": ["c", "f"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"], "additionalProperties": False}}},
]


def test_template_round_trip(checkpoint):
    tok = Tokenizer.from_pretrained(checkpoint)
    assert supports_tools(tok) and not supports_tools(Tokenizer.from_pretrained("deepseek_v2/default_model"))
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Rome, and 2+3?"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "5"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, tools=TOOLS)
    assert text.startswith(tok.bos_token + "Be brief.") and '"name": "get_weather"' in text  # the tools prompt
    start = text.index("<｜Assistant｜>") + len("<｜Assistant｜>")
    turn = text[start:text.index(tok.eos_token, start)]
    content, parsed = ToolCallParser.parse(turn)  # what the model would have written parses back
    assert content is None
    assert [(c.name, c.arguments) for c in parsed] == [(c["function"]["name"], c["function"]["arguments"])
                                                      for c in calls]
    assert text.endswith(f"{OUTPUT_BEGIN}5<｜tool▁output▁end｜>{OUTPUTS_END}")  # tool results, then the model
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.convert_tokens_to_ids(CALLS_BEGIN) in ids  # the markers are single special tokens


def test_offline_chat_writes_the_tools_into_the_prompt(checkpoint):
    from deepseek_v2 import LLM, SamplingParams
    llm = LLM(checkpoint, dtype="float32", device="cpu", num_kv_blocks=16)
    out = llm.chat(ASK, SamplingParams(max_tokens=1), tools=TOOLS, use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tools=TOOLS)
    assert out.prompt_token_ids != llm.tokenizer.apply_chat_template(ASK, add_generation_prompt=True)


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url, _ = start_server("--model", checkpoint, "--num-kv-blocks", "128", "--served-model-name", "tools")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


def test_named_tool_choice_gives_a_parseable_call(client):
    r = client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, max_tokens=100, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [tool_call] = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.id.startswith("call_")
    assert tool_call.function.name == "get_weather"
    args = json.loads(tool_call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f")


def test_required_tool_choice_streams_the_arguments_in_pieces(client):
    stream = client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, max_tokens=100, temperature=0.8,
                                            seed=3, tool_choice="required", parallel_tool_calls=False, stream=True)
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    first = pieces[0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name in ("get_weather", "add")
    arguments = "".join(p.function.arguments or "" for p in pieces)
    assert len([p for p in pieces if p.function.arguments]) > 1  # streamed as the model wrote them
    json.loads(arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)  # no markers leak into the content


def test_a_conversation_with_tool_results_goes_on(client):
    first = client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, max_tokens=100, temperature=0,
                                           tool_choice="required", parallel_tool_calls=False)
    message = first.choices[0].message
    history = ASK + [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"celsius": 21}'}]
    r = client.chat.completions.create(model="tools", messages=history, tools=TOOLS, max_tokens=8, temperature=0,
                                       tool_choice="none")
    assert r.choices[0].message.tool_calls in (None, []) and r.choices[0].finish_reason in ("stop", "length")


def test_tool_requests_refused_with_a_reason(server):
    bad = [({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}],
             "tool_choice": "required"}, "tools"),
           ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
           ({"tool_choice": "required"}, "tool_choice"),
           ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools")]
    for extra, param in bad:
        r = httpx.post(server + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **extra})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text


# ---- the Responses API: function tools, calls as output items, results as input items -----------------
RESPONSE_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


def test_responses_function_calls_streamed_and_not_and_the_conversation_goes_on(client):
    kw = dict(model="tools", input="What is the weather in Paris, in celsius?", tools=RESPONSE_TOOLS,
              max_output_tokens=100, temperature=0, tool_choice={"type": "function", "name": "get_weather"})
    r = client.responses.create(**kw)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert r.status == "completed" and set(json.loads(call.arguments)) == {"city", "unit"}
    chat = client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, max_tokens=100, temperature=0,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert call.arguments == chat.choices[0].message.tool_calls[0].function.arguments  # the same request
    events = list(client.responses.create(**kw, stream=True))
    types = [e.type for e in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1 and "".join(pieces) == call.arguments == events[-1].response.output[0].arguments
    # the call and its result as input items: the model answers in text
    then = client.responses.create(model="tools", tools=RESPONSE_TOOLS, tool_choice="none", max_output_tokens=8,
                                   temperature=0, input=[{"role": "user", "content": ASK[0]["content"]},
                                                         {"type": "function_call", "call_id": call.call_id,
                                                          "name": call.name, "arguments": call.arguments},
                                                         {"type": "function_call_output", "call_id": call.call_id,
                                                          "output": '{"celsius": 21}'}])
    assert [o.type for o in then.output] == ["message"] and then.output_text
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"celsius": 21}'}]
    same = client.chat.completions.create(model="tools", messages=history, tools=TOOLS, tool_choice="none",
                                          max_tokens=8, temperature=0)
    assert then.output_text == same.choices[0].message.content


# ---- Anthropic's Messages API: tool_use blocks out, tool_result blocks in ---------------------------------
def test_anthropic_tool_use_streamed_and_not_and_the_conversation_goes_on(server, client):
    anthropic = pytest.importorskip("anthropic")
    claude = anthropic.Anthropic(base_url=server, api_key="none", max_retries=0)
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]
    kw = dict(model="tools", max_tokens=100, tools=tools, messages=ASK, extra_body={"temperature": 0},
              tool_choice={"type": "tool", "name": "get_weather"})
    m = claude.messages.create(**kw)
    [use] = m.content
    assert use.type == "tool_use" and use.name == "get_weather" and set(use.input) == {"city", "unit"}
    assert m.stop_reason == "tool_use"
    chat = client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, max_tokens=100, temperature=0,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert use.input == json.loads(chat.choices[0].message.tool_calls[0].function.arguments)  # the same request
    with claude.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta"]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == use.input
    assert final.content[0].input == use.input and final.stop_reason == "tool_use"
    # the call and its result: the model answers in text, as the chat with the same history does
    history = [*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                                        "input": use.input}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                             "content": '{"celsius": 21}'}]}]
    then = claude.messages.create(model="tools", max_tokens=8, tools=tools, messages=history,
                                  tool_choice={"type": "none"}, extra_body={"temperature": 0})
    chat_history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": use.id, "content": '{"celsius": 21}'}]
    same = client.chat.completions.create(model="tools", messages=chat_history, tools=TOOLS, tool_choice="none",
                                          max_tokens=8, temperature=0)
    assert [b.type for b in then.content] == ["text"] and then.content[0].text == same.choices[0].message.content


def test_tokenize_renders_the_tools_as_chat_does(server, checkpoint):
    tok = Tokenizer.from_pretrained(checkpoint)
    r = httpx.post(server + "/tokenize", json={"messages": ASK, "tools": TOOLS})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == tok.apply_chat_template(ASK, add_generation_prompt=True, tools=TOOLS)


def test_responses_input_items_become_the_chat_messages_they_mean():
    from deepseek_v2.server.responses_api import ResponsesRequest
    call = {"type": "function_call", "name": "add", "arguments": '{"a":2,"b":3}'}
    request = ResponsesRequest.model_validate({"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "2+3"}, {"type": "input_text", "text": "?"}]},
        {"role": "assistant", "content": "Let me add."}, {**call, "call_id": "c1"}, {**call, "call_id": "c2"},
        {"type": "function_call_output", "call_id": "c1", "output": "5"}]})
    calls = [{"id": c, "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}} for c in ("c1", "c2")]
    assert request.messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
                                  {"role": "assistant", "content": "Let me add.", "tool_calls": calls},
                                  {"role": "tool", "tool_call_id": "c1", "content": "5"}]
    alone = ResponsesRequest.model_validate({"input": [{**call, "call_id": "c1"}]}).messages()
    assert alone == [{"role": "assistant", "content": None, "tool_calls": calls[:1]}]
