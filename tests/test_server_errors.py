# Run: python -m pytest -q tests/test_server_errors.py   (starts a server subprocess; the last test drains it)
"""Bad input never harms the server: each malformed request gets a 4xx with the OpenAI error body
naming the field, and the next request succeeds. Also: the limits on a request's size (body, prompts,
choices, the waiting queue), a huge prompt refused while streams and /health go on, slow bodies,
client disconnects freeing cache blocks and counted, engine death (in-process), AsyncLLMEngine itself,
and SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import httpx
import pytest

from deepseek_v2.engine.async_engine import AsyncLLMEngine, EngineOverloadedError
from deepseek_v2.sampling_params import SamplingParams
from server_process import metric, read, start_server, total, wait_until_idle

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")



MAX_LEN = 512
OK_BODY = {"prompt": "hello", "max_tokens": 2}
MSG = [{"role": "user", "content": "hi"}]
LIMITS = ("--max-waiting-requests", "6", "--max-prompts-per-request", "8", "--max-choices-per-request", "16",
          "--request-body-timeout", "1")


@pytest.fixture(scope="module")
def server():
    proc, url, log = start_server("--num-kv-blocks", "64", "--block-size", "16", "--max-model-len", str(MAX_LEN),
                                  "--max-num-seqs", "4", "--shutdown-timeout", "20", *LIMITS)
    yield proc, url, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def url(server):
    return server[1]


C, CHAT = "/v1/completions", "/v1/chat/completions"
BAD = [  # (path, body: dict or raw bytes, status, param)
    (C, b'{"prompt": "hi", ', 400, None),
    (C, b"[1, 2]", 400, None),
    (C, b"", 400, None),
    (C, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    (C, {"max_tokens": 5}, 400, "prompt"),
    (C, {"prompt": "hi", "max_tokens": "lots"}, 400, "max_tokens"),
    (C, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    (C, {"prompt": "hi", "n": 0}, 400, "n"),
    (C, {"prompt": "hi", "top_k": 0.5}, 400, "top_k"),
    (C, {"prompt": "hi", "stop": 5}, 400, "stop"),
    (C, {"prompt": {"text": "hi"}}, 400, "prompt"),
    (C, {"prompt": ["hi", 3]}, 400, "prompt"),
    (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": [[]]}, 400, "prompt"),
    (C, {"prompt": ["ok", ""]}, 400, "prompt"),
    (C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": MAX_LEN}, 400, "prompt"),
    (C, {"prompt": [7] * (MAX_LEN + 10), "max_tokens": 1}, 400, "prompt"),
    (C, {"prompt": [5000]}, 400, "prompt"),
    (C, {"prompt": [-1]}, 400, "prompt"),
    (C, {"prompt": [[1, 2], [4096]]}, 400, "prompt"),
    (C, {"prompt": "hi", "stop_token_ids": [99999]}, 400, "stop_token_ids"),
    (C, {"prompt": "hi", "stop_token_ids": [-5]}, 400, "stop_token_ids"),
    (C, {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    (C, {"prompt": [5, 6], "suffix": "end"}, 400, "suffix"),  # fill-in-the-middle takes text
    (C, {"prompt": "hi", "suffix": "end", "echo": True}, 400, "echo"),
    (C, {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    (C, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    (C, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (C, {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    (C, {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    (C, {"prompt": "hi", "seed": 2**63 - 2**16 + 1}, 400, "seed"),  # seed + i of the n samples must fit 64 bits
    (C, {"prompt": "hi", "stream": "on"}, 400, "stream"),  # strict types, as OpenAI's
    (C, {"prompt": "hi", "echo": "yes"}, 400, "echo"),
    (C, {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    (C, {"prompt": "hi", "temperature": "0"}, 400, "temperature"),
    (C, {"prompt": "hi", "n": 2.0}, 400, "n"),
    (C, {"prompt": [1, True]}, 400, "prompt"),
    (C, {"prompt": ["p"] * 9}, 400, "prompt"),  # --max-prompts-per-request 8
    (C, {"prompt": "hi", "n": 17}, 400, "n"),  # --max-choices-per-request 16
    (C, {"prompt": ["p"] * 4, "n": 2}, 400, "n"),  # 8 sequences could never wait: --max-waiting-requests 6
    (C, {"prompt": ["p"] * 7}, 400, "prompt"),
    (CHAT, {"messages": MSG, "n": 7}, 400, "n"),
    (C, {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
    (C, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"prompt": "hi", "logit_bias": {"x1": 5}}, 400, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": {"99999": 5}}, 400, "logit_bias"),  # out of the vocabulary
    (C, {"prompt": "hi", "logit_bias": {"1": "5"}}, 400, "logit_bias"),
    (C, {"prompt": "hi", "allowed_token_ids": []}, 400, "allowed_token_ids"),
    (C, {"prompt": "hi", "allowed_token_ids": [99999]}, 400, "allowed_token_ids"),
    (C, {"prompt": "hi", "bad_words": [" "]}, 400, "bad_words"),
    (C, {"prompt": "hi", "bad_words": ["a"], "allowed_token_ids": [5]}, 400, "bad_words"),
    (C, {"prompt": "hi", "allowed_token_ids": [5], "structured_outputs": {"choice": ["a"]}}, 400,
     "allowed_token_ids"),
    (C, {"prompt": "hi", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    # vLLM fields not implemented here: refused when set, never silently ignored
    (C, {"prompt": "hi", "use_beam_search": True, "stream": True}, 400, "stream"),
    (C, {"prompt": "hi", "use_beam_search": True, "structured_outputs": {"choice": ["a"]}}, 400, "structured_outputs"),
    (C, {"prompt": "hi", "prompt_logprobs": 1}, 400, "prompt_logprobs"),
    (C, {"prompt": "hi", "priority": 3}, 400, "priority"),
    (C, {"prompt": "hi", "return_tokens_as_token_ids": "yes"}, 400, "return_tokens_as_token_ids"),
    (C, {"prompt": "hi", "cache_salt": ""}, 400, "cache_salt"),
    (CHAT, {"messages": MSG, "echo": "yes"}, 400, "echo"),
    (CHAT, {"messages": MSG, "chat_template": "{{ 'x' }}"}, 400, "chat_template"),
    (CHAT, {"messages": MSG, "chat_template_kwargs": {"messages": []}}, 400, "chat_template_kwargs"),
    (CHAT, {"messages": MSG, "continue_final_message": True}, 400, "continue_final_message"),
    (CHAT, {"messages": MSG + [{"role": "assistant", "content": ""}], "continue_final_message": True,
            "add_generation_prompt": False}, 400, "messages"),
    (C, {"prompt": "hi", "guided_regex": "a(("}, 400, "guided_regex"),
    (C, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    (C, {"prompt": "hi", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "x " * 600}]}, 400, "messages"),
    (CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": MAX_LEN}, 400, "messages"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "model": "nope"}, 404, "model"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (CHAT, {"messages": MSG, "logprobs": 1}, 400, "logprobs"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema",
                                                 "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     400, "response_format"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    (CHAT, {"messages": MSG, "response_format": {"type": "xml"}}, 400, "response_format"),
    (C, {"prompt": "hi", "structured_outputs": {"regex": "a(("}}, 400, "structured_outputs"),
    (C, {"prompt": "hi", "structured_outputs": {"choice": []}}, 400, "structured_outputs"),
    (C, {"prompt": "hi", "structured_outputs": {"json": {}, "regex": "a"}}, 400, "structured_outputs"),
    (C, {"prompt": "hi", "response_format": {"type": "json_object"}, "ignore_eos": True}, 400, "ignore_eos"),
    ("/detokenize", {"tokens": [99999]}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"prompt": "x" * 100_000}, 400, "prompt"),  # it could not fit the context: not tokenized
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_then_success(url, path, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = httpx.post(url + path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    if status == 404:
        assert error["code"] == "model_not_found"
    assert httpx.post(url + C, json=OK_BODY).status_code == 200  # the server is unharmed


def test_other_bad_requests(url):
    r = httpx.post(url + C, content=json.dumps(OK_BODY), headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url + C, json={**OK_BODY, "max_tokens": MAX_LEN})
    assert r.json()["error"]["code"] == "context_length_exceeded" and str(MAX_LEN) in r.json()["error"]["message"]
    for body in ({"prompt": [7] * MAX_LEN, "max_tokens": None}, {"prompt": "x" * 100_000},  # no room; too long
                 {"messages": [{"role": "user", "content": "hi " * 400}]}):
        r = httpx.post(url + (CHAT if "messages" in body else C), json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = httpx.post(url + C, json={**OK_BODY, "seed": 2**63 - 2**16})  # the largest seed the message names
    assert r.status_code == 200, r.text
    assert httpx.post(url + C, json={**OK_BODY, "unknown_field": 1}).status_code == 200  # ignored, as vLLM does
    assert httpx.post(url + C, json={"prompt": "hi", "max_tokens": 2, "stream": True}).status_code == 200
    wait_until_idle(url)


def test_queue_limit_answers_503_with_retry_after(url):
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {"prompt": "busy", "max_tokens": 60, "ignore_eos": True}
            return await asyncio.gather(*(client.post(C, json=body) for _ in range(16)))

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 503} and codes.count(200) >= 4, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "queue_full"
    wait_until_idle(url)
    assert httpx.post(url + C, json=OK_BODY).status_code == 200
    # the largest request that can wait is accepted on an idle server (6 sequences: prompts x n)
    assert httpx.post(url + C, json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2}, timeout=60).status_code == 200


def test_huge_prompts_are_refused_quickly_while_streams_and_health_go_on(url):
    """A 10 MB body (past --max-request-body-mib) and a 2 MB prompt (within it, but more characters
    than the context can hold): refused before any tokenizing, while a stream keeps going."""
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            stamps = []

            async def stream():
                body = {"prompt": "keep going", "max_tokens": 300, "ignore_eos": True, "stream": True}
                async with client.stream("POST", C, json=body) as r:
                    async for line in r.aiter_lines():
                        if line:
                            stamps.append(time.monotonic())

            async def health():
                t0 = time.monotonic()
                assert (await client.get("/health")).status_code == 200
                return time.monotonic() - t0

            task = asyncio.ensure_future(stream())
            while len(stamps) < 3:
                await asyncio.sleep(0.01)
            huge = {"prompt": "word " * (2 * 2**20), "max_tokens": 4}  # 10 MiB of JSON
            big = {"prompt": "word " * (2**20 // 2), "max_tokens": 4}  # 2.5 MiB
            t0 = time.monotonic()
            responses = await asyncio.gather(client.post(C, json=huge), client.post(C, json=big),
                                             client.post("/tokenize", json={"prompt": big["prompt"]}), health())
            t1 = time.monotonic()
            await task
            return responses, t1 - t0, stamps

    (huge, big, tokenize, health_s), took, stamps = asyncio.run(main())
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    for r in (big, tokenize):
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert health_s < 1.0 and took < 5.0
    assert max(b - a for a, b in zip(stamps, stamps[1:])) < 1.0  # the stream never stalled


def test_body_limits_and_slow_bodies(url):
    def chunks():  # no Content-Length: the limit applies as the bytes arrive
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 2**19
        yield b'"}'

    r = httpx.post(url + C, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # half a body, then silence
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        answer = b""
        while chunk := s.recv(4096):  # the server answers and closes (--request-body-timeout 1)
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer
    assert httpx.post(url + C, json=OK_BODY).status_code == 200


def test_disconnect_mid_stream_frees_blocks(url):
    generated = metric(url, "generation_tokens_total")
    body = {"prompt": "long story", "max_tokens": MAX_LEN - 20, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + C, json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            assert next(lines).startswith("data: ")
            next(lines)
        assert metric(url, "kv_cache_free_blocks") < metric(url, "kv_cache_total_blocks")
    wait_until_idle(url, timeout=3)  # freed long before the request could have finished
    assert metric(url, "generation_tokens_total") - generated < MAX_LEN - 20
    assert httpx.post(url + C, json=OK_BODY).status_code == 200


def test_disconnect_non_streaming_frees_blocks_without_an_error(server):
    _, url, log = server
    generated = metric(url, "generation_tokens_total")
    closed, aborted = total(url, 'status="499"'), total(url, 'finished_reason="abort"')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + C, json={"prompt": "long", "max_tokens": MAX_LEN - 20, "ignore_eos": True},
                   timeout=httpx.Timeout(30, read=0.3))  # a slow connect is not the disconnect tested
    wait_until_idle(url, timeout=3)
    assert metric(url, "generation_tokens_total") - generated < MAX_LEN - 20
    # counted as a client that went away and an aborted sequence; no 500, no traceback in the log
    assert total(url, 'status="499"') == closed + 1 and total(url, 'finished_reason="abort"') == aborted + 1
    assert total(url, 'status="500"') == 0 and "Traceback" not in read(log)


# ---- in-process: AsyncLLMEngine and a dying engine -----------------------------------------------
def test_async_engine(tiny_engine):
    engine = tiny_engine(max_waiting_requests=3)
    greedy = SamplingParams(temperature=0, max_tokens=8)

    async def main():
        a = AsyncLLMEngine(engine)
        await a.start()
        with pytest.raises(ValueError, match="empty"):
            a.generate([], greedy, "empty")  # refused at once, before any iteration
        texts = await asyncio.gather(*(collect(a, f"prompt {i}", greedy, f"r{i}") for i in range(3)))
        # early exit (aclose) and cancellation both abort and free the blocks
        it = a.generate("abort me", SamplingParams(max_tokens=400, ignore_eos=True), "closed")
        await it.__anext__()
        await it.aclose()
        task = asyncio.create_task(collect(a, "cancel me", SamplingParams(max_tokens=400, ignore_eos=True), "c"))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.sleep(0.3)
        assert not engine.requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        # idle: the loop sleeps instead of stepping
        steps = engine.num_generation_tokens
        calls = []
        original = engine.step
        engine.step = lambda: calls.append(1) or original()
        await asyncio.sleep(0.3)
        assert not calls and engine.num_generation_tokens == steps
        engine.step = original
        # the waiting limit: accepted requests count as waiting until they are scheduled
        its = [a.generate("x", greedy, f"w{i}") for i in range(3)]
        with pytest.raises(EngineOverloadedError):
            a.generate("x", greedy, "w-over")
        for i in range(3):  # never started: abort() gives the places back
            a.abort(f"w{i}")
        assert a.stats()["num_waiting"] == 0
        a.generate("x", SamplingParams(n=2, max_tokens=2), "n2")  # a request of n samples holds n places
        with pytest.raises(EngineOverloadedError):
            a.generate("x", SamplingParams(n=2, max_tokens=2), "n2-over")
        a.abort("n2")
        assert a.stats()["num_waiting"] == 0
        assert [o async for o in its[0]] == []
        await a.shutdown()
        return texts

    texts = asyncio.run(main())
    offline = tiny_engine()
    for i, text in enumerate(texts):
        offline.add_request(str(i), f"prompt {i}", greedy)
    done = {}
    while offline.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].text for o in offline.step() if o.finished})
    assert texts == [done[str(i)] for i in range(3)]


async def collect(a: AsyncLLMEngine, prompt, params, rid) -> str:
    text = ""
    async for out in a.generate(prompt, params, rid):
        text += out.outputs[0].delta_text
    return text


def test_engine_death_fails_requests_and_health(tiny_engine):
    from fastapi.testclient import TestClient

    from deepseek_v2.server.app import build_app

    engine = tiny_engine()
    original, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("simulated device failure")
        return original()

    with TestClient(build_app(AsyncLLMEngine(engine), "tiny")) as client:
        assert client.post(C, json=OK_BODY).status_code == 200
        engine.step = flaky_step
        calls.clear()
        with client.stream("POST", C, json={"prompt": "x", "max_tokens": 50, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line]
        assert events[-1] == "data: [DONE]" and '"error"' in events[-2] and "simulated" in events[-2]
        r = client.post(C, json=OK_BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        health = client.get("/health")
        assert health.status_code == 503 and "simulated" in health.json()["error"]["message"]


def test_sigterm_drains_running_requests(server):
    """Runs last: it stops the module's server."""
    proc, url, _ = server
    body = {"prompt": "drain", "max_tokens": 120, "ignore_eos": True, "stream": True}
    chunks, done = 0, False
    with httpx.stream("POST", url + C, json=body, timeout=30) as r:
        for line in r.iter_lines():
            if not line:
                continue
            if chunks == 1:
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                try:  # draining: no new connections (or, just before the socket closes, a 503)
                    status = httpx.get(url + "/health", timeout=2).status_code
                except httpx.TransportError:
                    status = None
                assert status in (None, 503)
            if line == "data: [DONE]":
                done = True
            else:
                chunks += 1
                last = json.loads(line[len("data: "):])
    assert done and last["choices"][0]["finish_reason"] == "length"
    assert proc.wait(30) == 0  # a clean drain is a clean exit
