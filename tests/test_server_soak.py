# Run: python -m pytest -q -s tests/test_server_soak.py   (starts a server subprocess; -s prints the figures)
"""A soak: 300 mixed requests at concurrency 32 against one server, loopback only, bounded in count and
time. Completions and chats, streamed or not, n > 1 with seeds, streams cancelled mid-way, clients that
time out while waiting, malformed bodies. It holds when no answer is a 5xx, every greedy output equals
the same request run alone (offline, one at a time), every refused request got a 4xx with the OpenAI
error body, and every cache block is free at the end. docs/server.md quotes the figures it prints."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from deepseek_v2 import LLM, SamplingParams
from server_process import metrics, read, start_server, stop_server, wait_until_idle

pytest.importorskip("fastapi")

REQUESTS, CONCURRENCY, MAX_LEN = 300, 32, 256
PROMPTS = [f"Soak prompt {i}: the {word} of the" for i, word in enumerate(
    "river city engine winter garden market letter mountain signal harbor".split())]
LENGTHS = (4, 12)
CHATS = [[{"role": "user", "content": f"Question {i}?"}] for i in range(4)]
MALFORMED = [b'{"prompt": "x", ', b'{"prompt": ""}', b'{"prompt": "x", "max_tokens": -1}',
             b'{"prompt": "x", "temperature": "0"}', b'{"prompt": [99999]}', b'{"messages": []}',
             b'{"prompt": "x", "max_tokens": 4096}', b'{"prompt": "x", "n": 500}']


@pytest.fixture(scope="module")
def server():
    # asynchronous scheduling on, as on a GPU: streams cancelled and clients gone while steps run ahead
    proc, url, log = start_server("--max-model-len", str(MAX_LEN), "--num-kv-blocks", "256", "--block-size", "16",
                                  "--max-num-seqs", str(CONCURRENCY), "--async-scheduling", "on")
    yield url, log
    stop_server(proc)


@pytest.fixture(scope="module")
def alone():
    """Greedy outputs of each soak request run by itself on an offline engine."""
    llm = LLM(dtype="float32", device="cpu", max_model_len=MAX_LEN, num_kv_blocks=256, block_size=16)
    out = {}
    for prompt in PROMPTS:
        for n in LENGTHS:
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            out[prompt, n] = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
    for i, messages in enumerate(CHATS):
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        out["chat", i] = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    return out


def plan(rng: random.Random) -> list[tuple[str, object]]:
    kinds = (["complete"] * 30 + ["stream"] * 15 + ["chat"] * 10 + ["sampled"] * 10 + ["cancel"] * 12
             + ["timeout"] * 8 + ["malformed"] * 15)
    jobs = []
    for _ in range(REQUESTS):
        kind = rng.choice(kinds)
        arg = {"complete": lambda: (rng.choice(PROMPTS), rng.choice(LENGTHS)),
               "stream": lambda: (rng.choice(PROMPTS), rng.choice(LENGTHS)),
               "chat": lambda: rng.randrange(len(CHATS)), "sampled": lambda: rng.randrange(1000),
               "malformed": lambda: rng.choice(MALFORMED)}.get(kind, lambda: None)()
        jobs.append((kind, arg))
    return jobs


async def run(client: httpx.AsyncClient, kind: str, arg, expected: dict) -> str:
    """One request; returns its outcome class, asserting what it must hold."""
    greedy = {"temperature": 0, "ignore_eos": True}
    if kind == "complete":
        prompt, n = arg
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": n, **greedy})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[prompt, n], r.text
        return "ok"
    if kind == "stream":
        prompt, n = arg
        text = ""
        async with client.stream("POST", "/v1/completions",
                                 json={"prompt": prompt, "max_tokens": n, "stream": True, **greedy}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[len("data: "):])
                    assert "error" not in event, event
                    text += event["choices"][0]["text"]
        assert text == expected[prompt, n]
        return "ok"
    if kind == "chat":
        r = await client.post("/v1/chat/completions", json={"messages": CHATS[arg], "max_tokens": 8, **greedy})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected["chat", arg]
        return "ok"
    if kind == "sampled":
        r = await client.post("/v1/completions", json={"prompt": "Sampled", "n": 3, "seed": arg, "max_tokens": 6})
        assert r.status_code == 200 and len(r.json()["choices"]) == 3
        return "ok"
    if kind == "cancel":  # a stream dropped after two events
        body = {"prompt": "A long story", "max_tokens": 200, "stream": True, **greedy}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = 0
            async for line in r.aiter_lines():
                events += line.startswith("data: ")
                if events == 2:
                    break
        return "cancelled"
    if kind == "timeout":  # a client that gives up on a non-streaming request
        try:
            # only the wait for the answer is cut short: a loaded machine may take longer to connect
            r = await client.post("/v1/completions", json={"prompt": "Wait", "max_tokens": 200, **greedy},
                                  timeout=httpx.Timeout(120, read=0.2))
            assert r.status_code == 200
            return "ok"
        except httpx.ReadTimeout:
            return "disconnected"
    r = await client.post("/v1/completions" if b"prompt" in arg else "/v1/chat/completions", content=arg,
                          headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    return "refused"


def test_soak(server, alone):
    url, log = server
    jobs = plan(random.Random(0))

    async def main():
        gate = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY + 8)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            async def one(kind, arg):
                async with gate:
                    t0 = time.monotonic()
                    outcome = await run(client, kind, arg, alone)
                    return outcome, time.monotonic() - t0
            return await asyncio.gather(*(one(kind, arg) for kind, arg in jobs))

    t0 = time.monotonic()
    results = asyncio.run(main())
    took = time.monotonic() - t0
    idle = wait_until_idle(url, timeout=10)
    m = metrics(url)
    statuses: dict[str, int] = {}  # the server's own count of its /v1 answers
    for key, value in m.items():
        if "http_requests_total" in key and 'handler="/v1/' in key:
            status = key.split('status="')[1].split('"')[0]
            statuses[status] = statuses.get(status, 0) + int(value)
    assert not any(s.startswith("5") for s in statuses), statuses
    assert "Traceback" not in read(log)
    assert next(v for k, v in m.items() if k.startswith("deepseek_v2:steps_launched_ahead_total")) > 0
    outcomes = [o for o, _ in results]
    latencies = sorted(t for o, t in results if o == "ok")
    counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    print(f"\nsoak: {len(jobs)} requests at concurrency {CONCURRENCY} in {took:.1f} s: {counts}; "
          f"server statuses {dict(sorted(statuses.items()))}; p50 {latencies[len(latencies) // 2]:.2f} s, "
          f"p99 {latencies[int(len(latencies) * 0.99)]:.2f} s (completed requests); "
          f"{int(idle['kv_cache_free_blocks'])} of {int(idle['kv_cache_total_blocks'])} blocks free at the end")
    assert counts.get("cancelled", 0) > 0 and counts.get("refused", 0) > 0 and counts.get("disconnected", 0) > 0
