# Run: python -m pytest -q tests/test_server.py   (starts `python -m deepseek_v2.server.cli` on a free port)
"""The OpenAI-compatible server against the official `openai` client: completions, chat, streaming,
n > 1, stop strings, seeds, logprobs, echo with prompt logprobs, usage, API keys, service routes
and 32 concurrent streaming clients. Expected texts come from the offline engine (`LLM`)."""

from __future__ import annotations

import asyncio
import json

import jsonschema

import httpx
import pytest
import torch

from deepseek_v2 import LLM, SamplingParams
from server_process import series, start_server, stop_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


KEYS = ("sk-test-one", "sk-test-two")
# the server below has 256 cache blocks of 64 tokens: its context is what they hold (the shipped
# model's own limit, 32,768, is longer)
MAX_MODEL_LEN = 256 * 64
GREEDY = dict(temperature=0)


@pytest.fixture(scope="module")
def server():
    # asynchronous scheduling on, as on a GPU (on CPU it is off unless asked): every answer below must
    # still equal the offline engine's
    proc, url, _ = start_server("--num-kv-blocks", "256", "--api-key", KEYS[0], "--api-key", KEYS[1],
                                "--served-model-name", "tiny", "alias", "--async-scheduling", "on")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEYS[0], max_retries=0)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu", num_kv_blocks=256)


def offline(llm, prompt, **kw) -> list:
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0].outputs


def offline_chat(llm, messages, **kw) -> str:
    return llm.chat(messages, SamplingParams(**kw), use_tqdm=False)[0].outputs[0].text


def sse_events(url: str, path: str, body: dict) -> list:
    """The raw Server-Sent Events of a streamed request: parsed JSON objects, then "[DONE]"."""
    events = []
    with httpx.stream("POST", url + path, json=body, headers={"Authorization": f"Bearer {KEYS[0]}"},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- basics ------------------------------------------------------------------------------------
def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "alias"]
    assert models[0].max_model_len == MAX_MODEL_LEN
    assert client.models.retrieve("alias").id == "alias"


def test_completion_matches_offline(client, llm):
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=12, **GREEDY,
                                  extra_body={"ignore_eos": True})  # the model may end early otherwise
    expect = offline(llm, "The quick brown fox", max_tokens=12, ignore_eos=True, **GREEDY)[0]
    assert r.object == "text_completion" and r.choices[0].text == expect.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_prompt_forms_and_choice_indices(client, llm):
    ids = llm.tokenizer.encode("Once upon a time")
    texts = [client.completions.create(model="tiny", prompt=p, max_tokens=6, **GREEDY).choices[0].text
             for p in ("Once upon a time", ids)]
    assert texts[0] == texts[1] == offline(llm, ids, max_tokens=6, **GREEDY)[0].text
    r = client.completions.create(model="tiny", prompt=["Once upon a time", "Hello"], max_tokens=6, n=2, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == texts[0]
    r = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=6, **GREEDY)
    assert r.choices[0].text == texts[0] and r.usage.prompt_tokens == len(ids) + 3


def test_chat_multi_turn_uses_template(client, llm):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a story"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, **GREEDY)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == offline_chat(llm, messages, max_tokens=10, **GREEDY)
    prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(prompt)
    r = client.chat.completions.create(model="tiny", messages=messages[1:2], max_completion_tokens=3, **GREEDY)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


# ---- streaming ---------------------------------------------------------------------------------
def test_chat_stream_format_and_text(server, client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Count to ten"}], "max_tokens": 16,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(server, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    first, *deltas, usage_chunk, _ = events
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == first["id"] for e in deltas)
    assert [e["choices"][0]["finish_reason"] for e in deltas][-1] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in deltas[:-1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 16
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in deltas)
    plain = client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=16, **GREEDY)
    assert streamed == plain.choices[0].message.content


def test_completion_stream_with_openai_client(client):
    kw = dict(model="tiny", prompt="In the beginning", max_tokens=20, **GREEDY)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == client.completions.create(**kw).choices[0].text
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-2].choices[0].finish_reason == "length"
    # vLLM's continuous_usage_stats: the usage so far on every chunk
    steady = [c for c in client.completions.create(stream=True, **kw, extra_body={"stream_options": {
        "include_usage": True, "continuous_usage_stats": True}}) if c.choices]
    counts = [c.usage.completion_tokens for c in steady]
    assert counts == sorted(counts) and counts[-1] == 20 and len(steady) >= 10
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in steady)
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2,
                                               max_tokens=5, stream=True, seed=3))
    assert {c.choices[0].index for c in chat if c.choices} == {0, 1}


# ---- sampling ----------------------------------------------------------------------------------
def test_n_and_seed(client):
    kw = dict(model="tiny", prompt="Random words:", max_tokens=12, temperature=1.0, n=3, seed=1234)
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    assert a == b and len(set(a)) > 1  # reproducible, and the samples differ from each other
    c = [c.text for c in client.completions.create(**{**kw, "seed": 99}).choices]
    assert c != a
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=4, seed=5, temperature=1.0)
    assert [ch.index for ch in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8


def test_stop_strings_and_stop_token_ids(client, llm):
    full = offline(llm, "Stop test", max_tokens=24, ignore_eos=True, **GREEDY)[0]
    stop = full.text[8:12]
    assert len(stop) == 4
    r = client.completions.create(model="tiny", prompt="Stop test", max_tokens=24, stop=[stop], **GREEDY,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full.text[:full.text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="Stop test", max_tokens=24, **GREEDY,
                                  extra_body={"stop_token_ids": [full.token_ids[5]], "ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == full.token_ids.index(full.token_ids[5]) + 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Stop test", max_tokens=24, stop=stop, stream=True, **GREEDY,
        extra_body={"ignore_eos": True}))
    assert streamed == full.text[:full.text.index(stop)]


def test_logit_bias_allowed_token_ids_bad_words_and_truncation_equal_offline(client, llm):
    """OpenAI's logit_bias (token ids as strings) and vLLM's allowed_token_ids, bad_words and
    truncate_prompt_tokens give what the offline engine gives with the same SamplingParams."""
    tok = llm.tokenizer
    kw = dict(max_tokens=8, ignore_eos=True, **GREEDY)
    full = offline(llm, "Biased text", **kw)[0]
    bias = {full.token_ids[0]: -100, full.token_ids[3]: 5.5}
    r = client.completions.create(model="tiny", prompt="Biased text", logit_bias={str(t): b for t, b in bias.items()},
                                  **GREEDY, max_tokens=8, extra_body={"ignore_eos": True})
    expect = offline(llm, "Biased text", logit_bias=bias, **kw)[0]
    assert r.choices[0].text == expect.text != full.text
    allowed = sorted(set(full.token_ids[:3]))
    r = client.completions.create(model="tiny", prompt="Biased text", max_tokens=8, seed=5, logprobs=0,
                                  extra_body={"ignore_eos": True, "allowed_token_ids": allowed})
    assert r.choices[0].text == offline(llm, "Biased text", max_tokens=8, seed=5, ignore_eos=True,
                                        allowed_token_ids=allowed)[0].text
    tokens = r.choices[0].logprobs.tokens
    assert len(tokens) == 8 and set(tokens) <= {tok.decode([t]) for t in allowed}
    word = tok.decode(full.token_ids[2:4]).strip() or "the"
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Biased text"}],
                                       max_tokens=8, **GREEDY, extra_body={"ignore_eos": True, "bad_words": [word]})
    assert r.choices[0].message.content == offline_chat(llm, [{"role": "user", "content": "Biased text"}],
                                                        bad_words=[word], **kw)
    ids = tok.encode("one two three four five six")
    r = client.completions.create(model="tiny", prompt="one two three four five six", max_tokens=3, echo=True,
                                  **GREEDY, extra_body={"truncate_prompt_tokens": 3})
    assert r.usage.prompt_tokens == 3
    assert r.choices[0].text == tok.decode(ids[-3:]) + offline(llm, ids[-3:], max_tokens=3, **GREEDY)[0].text


def test_continue_final_message_and_tokenize_equal_offline(server, client, llm):
    """An assistant reply begun by the client is continued (vLLM's continue_final_message, which needs
    add_generation_prompt=false), as LLM.chat continues it; /tokenize renders the same prompt."""
    messages = [{"role": "user", "content": "What does the word harbor mean?"},
                {"role": "assistant", "content": "It means"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, **GREEDY, extra_body={
        "continue_final_message": True, "add_generation_prompt": False, "chat_template_kwargs": {"unused": 1}})
    expect = llm.chat(messages, SamplingParams(max_tokens=8, **GREEDY), add_generation_prompt=False,
                      continue_final_message=True, use_tqdm=False)[0]
    assert r.choices[0].message.content == expect.outputs[0].text
    assert r.usage.prompt_tokens == len(expect.prompt_token_ids)
    # vLLM's echo: the reply repeats the last (assistant) message first, streamed or not
    kw = dict(model="tiny", messages=messages, max_tokens=8, **GREEDY, extra_body={
        "continue_final_message": True, "add_generation_prompt": False, "echo": True})
    echoed = client.chat.completions.create(**kw)
    assert echoed.choices[0].message.content == "It means" + expect.outputs[0].text
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True))
    assert streamed == echoed.choices[0].message.content
    replies = [client.chat.completions.create(model="tiny", messages=messages[:1], max_tokens=3, **GREEDY,
                                              extra_body={"echo": echo}).choices[0].message.content
               for echo in (False, True)]
    assert replies[0] == replies[1]  # a last user message is not repeated
    ids = httpx.post(server + "/tokenize", json={"messages": messages, "continue_final_message": True,
                                                 "add_generation_prompt": False}).json()["tokens"]
    assert ids == expect.prompt_token_ids == llm.tokenizer.encode(
        llm.tokenizer.apply_chat_template(messages, tokenize=False)[:-len(llm.tokenizer.eos_token)],
        add_special_tokens=False)


def test_responses_api_equals_the_chat_it_means(client, llm):
    """/v1/responses: instructions and input as the chat's messages, the text as a message item, usage,
    max_output_tokens as an incomplete status; its stream's typed events; refusals name its fields."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a harbor?"}]
    r = client.responses.create(model="tiny", instructions="Be brief.", input="What is a harbor?",
                                max_output_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    expect = llm.chat(messages, SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY), use_tqdm=False)[0]
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert [o.type for o in r.output] == ["message"] and r.output_text == expect.outputs[0].text
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (len(expect.prompt_token_ids), 12)
    assert r.instructions == "Be brief." and r.max_output_tokens == 12 and r.temperature == 0
    events = list(client.responses.create(model="tiny", input=messages, max_output_tokens=12, temperature=0,
                                          stream=True, extra_body={"ignore_eos": True}))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                            "response.content_part.added"]
    assert [e.type for e in events[-4:]] == ["response.output_text.done", "response.content_part.done",
                                             "response.output_item.done", "response.incomplete"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == events[-1].response.output_text == expect.outputs[0].text
    done = client.responses.create(model="tiny", input="Hi", max_output_tokens=200, temperature=0)
    assert done.status == "completed" and done.output_text == offline_chat(
        llm, [{"role": "user", "content": "Hi"}], max_tokens=200, **GREEDY)
    for body, param in [({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
                        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
                        ({"input": "x", "max_output_tokens": MAX_MODEL_LEN}, "input"),
                        ({"input": []}, "input"), ({"input": [{"role": "wizard", "content": "x"}]}, "input"),
                        ({"input": "x", "n": 2}, "n"), ({"input": "x", "text": {"format": {"type": "xml"}}}, "text"),
                        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.post("/responses", body=body, cast_to=object)
        assert info.value.body["param"] == param, info.value.body
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)  # nothing is stored


def test_suffix_fills_in_the_middle(client, llm):
    """suffix: DeepSeek-Coder's fill-in-the-middle prompt, the same as the offline engine given it."""
    prompt = llm.tokenizer.fill_in_middle("def add(a, b):\n", "\n    return c\n")
    assert prompt == "<｜fim▁begin｜>def add(a, b):\n<｜fim▁hole｜>\n    return c\n<｜fim▁end｜>"
    r = client.completions.create(model="tiny", prompt="def add(a, b):\n", suffix="\n    return c\n", max_tokens=8,
                                  **GREEDY)
    expect = offline(llm, prompt, max_tokens=8, **GREEDY)[0]
    assert r.choices[0].text == expect.text and r.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))


def test_anthropic_messages_equal_the_chat_they_mean(server, llm):
    """/v1/messages through Anthropic's own client: system and messages as the chat's, a text block,
    stop reasons, usage, the stream's events, count_tokens, output_config's JSON schema, errors in
    Anthropic's envelope, and the key as x-api-key."""
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=server, api_key=KEYS[0], max_retries=0)
    ask = [{"role": "user", "content": "What is a harbor?"}]
    chat = [{"role": "system", "content": "Be brief."}, *ask]
    expect = llm.chat(chat, SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY), use_tqdm=False)[0]
    m = client.messages.create(model="tiny", max_tokens=12, system="Be brief.", messages=ask,
                               extra_body={"temperature": 0, "ignore_eos": True})
    assert m.id.startswith("msg_") and m.role == "assistant" and m.model == "tiny"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == expect.outputs[0].text
    assert m.stop_reason == "max_tokens" and (m.usage.input_tokens, m.usage.output_tokens) == (
        len(expect.prompt_token_ids), 12)
    with client.messages.stream(model="tiny", max_tokens=12, system=[{"type": "text", "text": "Be brief."}],
                                messages=ask, extra_body={"temperature": 0, "ignore_eos": True}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-1] == "message_stop" and "content_block_delta" in types
    assert final.content[0].text == expect.outputs[0].text and final.stop_reason == "max_tokens"
    assert client.messages.count_tokens(model="tiny", system="Be brief.", messages=ask).input_tokens == len(
        expect.prompt_token_ids)
    full = offline_chat(llm, ask, max_tokens=30, ignore_eos=True, **GREEDY)
    stop = full[6:9]
    m = client.messages.create(model="tiny", max_tokens=30, messages=ask, stop_sequences=[stop],
                               extra_body={"temperature": 0, "ignore_eos": True})
    assert (m.stop_reason, m.stop_sequence, m.content[0].text) == ("stop_sequence", stop, full[:full.index(stop)])
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    m = client.messages.create(model="tiny", max_tokens=40, messages=ask,
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(m.content[0].text), schema)
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="tiny", max_tokens=0, messages=ask)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "invalid_request_error"
    assert info.value.body["error"]["param"] == "max_tokens"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="tiny", max_tokens=5, messages=ask, thinking={"type": "enabled",
                                                                                   "budget_tokens": 1024})
    with pytest.raises(anthropic.BadRequestError) as info:  # a chat field the Messages API has not
        client.messages.create(model="tiny", max_tokens=5, messages=ask, extra_body={"n": 2})
    assert info.value.body["error"]["param"] == "n"
    with pytest.raises(anthropic.AuthenticationError) as info:
        anthropic.Anthropic(base_url=server, api_key="sk-wrong", max_retries=0).messages.create(
            model="tiny", max_tokens=5, messages=ask)
    assert info.value.body["error"]["type"] == "authentication_error"


def test_return_token_ids_streamed_and_not(server, client, llm):
    """vLLM's return_token_ids: the prompt's ids and the generated ids, on the choice (completions) or the
    response and its choices (chat); streamed, the prompt's on the first chunk and each chunk's own ids."""
    kw = dict(model="tiny", prompt="Token ids", max_tokens=10, **GREEDY)
    expect = offline(llm, "Token ids", max_tokens=10, **GREEDY)[0]
    plain = client.completions.create(**kw).model_dump()
    assert "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain["choices"][0]
    r = client.completions.create(**kw, extra_body={"return_token_ids": True}).model_dump()["choices"][0]
    assert r["prompt_token_ids"] == llm.tokenizer.encode("Token ids") and r["token_ids"] == expect.token_ids
    named = client.completions.create(**kw, logprobs=2, extra_body={"return_tokens_as_token_ids": True}).choices[0]
    assert named.logprobs.tokens == [f"token_id:{t}" for t in expect.token_ids]
    assert all(k.startswith("token_id:") for top in named.logprobs.top_logprobs for k in top)
    assert named.logprobs.text_offset == client.completions.create(**kw, logprobs=2).choices[0].logprobs.text_offset
    chunks = [c.model_dump()["choices"][0] for c in client.completions.create(
        **kw, stream=True, extra_body={"return_token_ids": True}) if c.choices]
    assert chunks[0]["prompt_token_ids"] == r["prompt_token_ids"]
    assert [t for c in chunks for t in c["token_ids"]] == expect.token_ids
    ask = [{"role": "user", "content": "Token ids"}]
    chat_expect = llm.chat(ask, SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)[0]
    chat = client.chat.completions.create(model="tiny", messages=ask, max_tokens=10, **GREEDY,
                                          extra_body={"return_token_ids": True}).model_dump()
    assert chat["prompt_token_ids"] == chat_expect.prompt_token_ids
    assert chat["choices"][0]["token_ids"] == chat_expect.outputs[0].token_ids
    lp = client.chat.completions.create(model="tiny", messages=ask, max_tokens=10, **GREEDY, logprobs=True,
                                        top_logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    assert [c.token for c in lp.choices[0].logprobs.content] == [f"token_id:{t}" for t in
                                                                 chat_expect.outputs[0].token_ids]
    events = sse_events(server, "/v1/chat/completions", {"model": "tiny", "messages": ask, "max_tokens": 10,
                                                          "temperature": 0, "stream": True, "return_token_ids": True})
    assert events[0]["prompt_token_ids"] == chat_expect.prompt_token_ids
    assert [t for e in events[1:-1] for t in e["choices"][0]["token_ids"]] == chat_expect.outputs[0].token_ids


def test_cache_salt_keeps_prefixes_apart(client):
    prompt = " ".join(f"salted{i}" for i in range(150))  # a few full cache blocks
    def cached(**extra) -> int:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, extra_body=extra)
        return r.usage.prompt_tokens_details.cached_tokens
    assert cached(cache_salt="tenant-a") == 0
    assert cached(cache_salt="tenant-a") >= 64  # the same salt shares the prefix
    assert cached(cache_salt="tenant-b") == 0 and cached() == 0  # another salt, or none, does not


def test_use_beam_search_equals_offline_beam_search(client, llm):
    """vLLM's use_beam_search with n beams: the n sequences LLM.beam_search finds, best first, on both
    endpoints; what a search cannot give (a stream, logprobs, more than 10 beams) is refused by name."""
    from deepseek_v2 import BeamSearchParams
    r = client.completions.create(model="tiny", prompt="The dictionary is", max_tokens=6, n=3,
                                  extra_body={"use_beam_search": True, "ignore_eos": True})
    [expect] = llm.beam_search(["The dictionary is"], BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))
    assert [c.text for c in r.choices] == [s.text for s in expect.sequences]
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 18
    ask = [{"role": "user", "content": "What is a harbor?"}]
    chat = client.chat.completions.create(model="tiny", messages=ask, max_tokens=5, n=2,
                                          extra_body={"use_beam_search": True, "length_penalty": 0.5})
    prompt = llm.tokenizer.apply_chat_template(ask, add_generation_prompt=True)
    [expect] = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=5, length_penalty=0.5))
    assert [c.message.content for c in chat.choices] == [s.text for s in expect.sequences]
    for extra, param in [({"stream": True}, "stream"), ({"logprobs": 2}, "logprobs"), ({"n": 11}, "n")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.post("/completions", cast_to=object, body={"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                              "use_beam_search": True, **extra})
        assert info.value.body["param"] == param


def test_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Logprobs", max_tokens=5, logprobs=3, **GREEDY,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 3 <= len(top) <= 4 and top[token] == value
        assert value == pytest.approx(max(top.values()))  # greedy: the chosen token is the best
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=2, **GREEDY, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)


def test_echo_prompt_logprobs_equal_log_softmax(client, llm):
    """What lm-evaluation-harness sends to score a continuation."""
    ids = llm.tokenizer.encode("The capital of France is Paris")
    r = client.completions.create(model="tiny", prompt=[ids], max_tokens=1, logprobs=1, echo=True, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = llm.engine.model(torch.tensor([ids])).log_softmax(-1)[0]
    expect = [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expect, abs=1e-4)
    assert r.choices[0].text.startswith(llm.tokenizer.decode(ids))
    # max_tokens=0 with echo scores the prompt only
    r = client.completions.create(model="tiny", prompt="Score me", max_tokens=0, logprobs=0, echo=True)
    n = len(llm.tokenizer.encode("Score me"))
    assert r.choices[0].text == "Score me" and len(r.choices[0].logprobs.token_logprobs) == n
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == n


def test_echo_text_offsets_index_the_returned_text(client, llm):
    """text_offset[i] is where token i starts in the returned text, streamed or not; special tokens
    are not in the text and take no room (the BOS the tokenizer put before a text prompt, the BOS
    and EOS this random model generates)."""
    specials = {llm.tokenizer.decode([t]) for t in llm.tokenizer.all_special_ids}
    kw = dict(model="tiny", prompt="Offsets of echoed tokens", max_tokens=8, logprobs=0, echo=True, **GREEDY,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw)]
    text, lp = plain.text, plain.logprobs
    assert text.startswith("Offsets of echoed tokens") and lp.tokens[0] in specials
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == lp.text_offset
    assert "".join(c.text for c in chunks) == text
    ends = lp.text_offset[1:] + [len(text)]
    for token, offset, end in zip(lp.tokens, lp.text_offset, ends):
        assert text[offset:end] == ("" if token in specials else token)


# ---- keys, service routes, metrics -------------------------------------------------------------
def test_api_keys(server):
    good = openai.OpenAI(base_url=server + "/v1", api_key=KEYS[1], max_retries=0)
    assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(server + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server + "/health").status_code == 200  # only /v1 is protected
    metrics = httpx.get(server + "/metrics").text
    assert series(metrics, "api_key_completion_tokens_total", model_name="tiny", api_key="key-2") == 2
    assert series(metrics, "http_requests_total", api_key="unauthorized", handler="/v1/completions", status="401")
    # every response is counted
    assert series(metrics, "http_requests_total", api_key="anonymous", handler="/health", status="200")


def test_service_routes(server):
    tok = httpx.post(server + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == MAX_MODEL_LEN
    text = httpx.post(server + "/detokenize", json={"tokens": tok["tokens"][1:]}).json()["prompt"]
    assert text == "Hello world"
    chat = httpx.post(server + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3
    assert httpx.get(server + "/version").json()["version"]
    assert httpx.get(server + "/tokenizer_info").json()["eos_token"] == "<｜end▁of▁sentence｜>"
    assert "<html" in httpx.get(server + "/").text


def test_metrics(server, client):
    client.completions.create(model="tiny", prompt="metrics", max_tokens=3)
    text = httpx.get(server + "/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    label = '{model_name="tiny"}'
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate"):
        assert f"deepseek_v2:{name}{label}" in values
    assert values[f"deepseek_v2:prompt_tokens_total{label}"] > 0
    assert values[f"deepseek_v2:generation_tokens_total{label}"] >= 3
    assert values[f"deepseek_v2:steps_launched_ahead_total{label}"] >= 1  # the server runs with it on
    assert values[f"deepseek_v2:time_to_first_token_seconds_count{label}"] > 0
    assert values[f"deepseek_v2:time_per_output_token_seconds_count{label}"] > 0
    assert series(text, "time_to_first_token_seconds_bucket", model_name="tiny", le="+Inf") > 0


def test_concurrent_streams(server, llm):
    prompts = [f"Client number {i} says" for i in range(32)]
    expect = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(max_tokens=16, **GREEDY),
                                                      use_tqdm=False)]

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=16, stream=True, **GREEDY)
        return "".join([c.choices[0].text async for c in stream])

    async def main():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEYS[0], max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    assert asyncio.run(main()) == expect


# ---- structured outputs ---------------------------------------------------------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
          "required": ["name", "age", "pets"], "additionalProperties": False}


def test_response_format_json_schema_on_chat_and_completions(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A person?"}],
                                          max_tokens=80, temperature=0, response_format=fmt)
    jsonschema.validate(json.loads(chat.choices[0].message.content), PERSON)
    done = client.completions.create(model="tiny", prompt="Person:", max_tokens=80, temperature=0.9, seed=2,
                                     extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(done.choices[0].text), PERSON)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "A person?"}], max_tokens=80, temperature=0,
        response_format=fmt, stream=True) if c.choices)
    assert streamed == chat.choices[0].message.content


def test_structured_outputs_choice_and_json_object(client):
    r = client.completions.create(model="tiny", prompt="Is it?", max_tokens=8, temperature=1.0, n=4, seed=1,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {c.text for c in r.choices} <= {"yes", "no"}
    # vLLM's older guided_* fields mean the same
    old = client.completions.create(model="tiny", prompt="Is it?", max_tokens=8, temperature=1.0, n=4, seed=1,
                                    extra_body={"guided_choice": ["yes", "no"]})
    assert [c.text for c in old.choices] == [c.text for c in r.choices]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                       max_tokens=60, temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length" or isinstance(json.loads(r.choices[0].message.content), dict)
