# Run: python -m pytest -q tests/test_server_faults.py   (in-process engines, and three server subprocesses)
"""Faults and fairness: a step that raises fails only its own requests and leaves the engine consistent;
a fatal error ends the server with a log line and status 1; past the shutdown grace period requests get
the `aborted` error and the server still exits 0; one request of many prompts does not starve the
requests behind it; tokenizing does not hold the event loop; errors the framework answers are counted."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
import torch

from deepseek_v2.engine.async_engine import AsyncLLMEngine
from deepseek_v2.engine.llm_engine import LLMEngine, StepError
from deepseek_v2.engine.workers import WorkerError
from deepseek_v2.sampling_params import SamplingParams
from faulty_server import FATAL_FAULT, STEP_FAULT
from server_process import read, series, start_server, stop_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

C = "/v1/completions"
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def run_all(engine: LLMEngine) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return done


# ---- the engine ------------------------------------------------------------------------------------
def test_failed_step_aborts_only_its_requests_and_the_engine_goes_on(tiny_engine):
    engine = tiny_engine(max_num_seqs=2)  # "c" waits while "a" and "b" run
    for rid, prompt in (("a", "first prompt"), ("b", "second prompt"), ("c", "third prompt")):
        engine.add_request(rid, prompt, GREEDY)
    engine.step()
    engine.step()
    launch, calls = engine.runner.launch, []

    def oom_once(sched):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return launch(sched)

    engine.runner.launch = oom_once
    with pytest.raises(StepError) as info:
        engine.step()
    assert info.value.request_ids == ["a", "b"] and isinstance(info.value.cause, torch.OutOfMemoryError)
    bm = engine.block_manager
    assert set(engine.requests) == {"c"} and not engine.scheduler.running  # consistent: nothing half-run
    assert bm.num_free_blocks == bm.num_blocks
    engine.add_request("d", "first prompt", GREEDY)
    outputs = run_all(engine)
    alone = tiny_engine()
    alone.add_request("c", "third prompt", GREEDY)
    alone.add_request("d", "first prompt", GREEDY)
    assert outputs == run_all(alone)  # the survivors and later requests are served as if nothing happened
    assert bm.num_free_blocks == bm.num_blocks

    def lost_rank(sched):
        raise WorkerError("injected: tensor-parallel rank 1 exited")

    engine.add_request("e", "x", GREEDY)
    engine.runner.launch = lost_rank
    with pytest.raises(WorkerError):  # fatal: not turned into a StepError
        engine.step()


def test_a_failed_step_launched_ahead_aborts_its_requests_and_the_engine_goes_on(tiny_engine):
    """With asynchronous scheduling a step may fail while the next one is already launched: both steps'
    requests fail (the same sequences), the step launched ahead is dropped, and the blocks it held are
    free again; later requests are served as by an engine that never failed."""
    engine = tiny_engine(async_scheduling="on", num_kv_blocks=64)
    for rid, prompt in (("a", "first prompt"), ("b", "second prompt")):
        engine.add_request(rid, prompt, GREEDY)
    for _ in range(3):
        engine.step()
    assert engine._ahead is not None and engine.stats()["steps_launched_ahead"] > 0
    collect = engine.runner.collect

    def oom(launched):
        raise torch.OutOfMemoryError("injected: CUDA out of memory")

    engine.runner.collect = oom
    with pytest.raises(StepError) as info:
        engine.step()
    engine.runner.collect = collect
    assert sorted(info.value.request_ids) == ["a", "b"] and engine._ahead is None
    bm = engine.block_manager
    assert not engine.requests and not engine.scheduler.running and bm.num_free_blocks == bm.num_blocks
    engine.add_request("c", "third prompt", GREEDY)
    alone = tiny_engine(async_scheduling="off")
    alone.add_request("c", "third prompt", GREEDY)
    assert run_all(engine) == run_all(alone)


def test_a_small_request_is_not_starved_behind_a_big_one(tiny_engine):
    engine = tiny_engine(max_num_seqs=4, num_kv_blocks=256)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    order: list[str] = []

    async def consume(it, name):
        async for out in it:
            if out.finished:
                order.append(name)

    async def main():
        a = AsyncLLMEngine(engine)
        await a.start()
        big = [consume(a.generate(f"big prompt {i}", params, f"big-{i}", group="big"), "big") for i in range(40)]
        tasks = [asyncio.ensure_future(t) for t in big]
        while engine.num_generation_tokens == 0:  # the first wave of the big request runs
            await asyncio.sleep(0.01)
        await consume(a.generate("small", params, "small"), "small")
        await asyncio.gather(*tasks)
        await a.shutdown()

    asyncio.run(main())
    # First come, first served would finish all 40 big prompts first. Taking turns, the small request
    # joins the batch as soon as the first wave (max_num_seqs prompts) leaves it.
    assert order.index("small") <= 2 * 4, order


# ---- the app in-process ----------------------------------------------------------------------------
def test_tokenizing_does_not_hold_the_event_loop_and_framework_errors_are_counted(tiny_engine):
    from fastapi.testclient import TestClient

    from deepseek_v2.server.app import build_app

    engine = tiny_engine()
    tok = engine.tokenizer
    encode, started = tok.encode, threading.Event()

    def slow_encode(text, add_special_tokens=True):
        if text == "tokenize me slowly":
            started.set()
            time.sleep(2)  # a long text's tokenizing (which gives the GIL up, as this does)
        return encode(text, add_special_tokens=add_special_tokens)

    tok.encode = slow_encode
    async_engine = AsyncLLMEngine(engine)
    with TestClient(build_app(async_engine, "tiny")) as client:
        slow = threading.Thread(target=lambda: client.post(C, json={"prompt": "tokenize me slowly", "max_tokens": 2}))
        slow.start()
        assert started.wait(10)
        t0 = time.monotonic()
        assert client.get("/health").status_code == 200
        assert time.monotonic() - t0 < 1.0  # answered while the other request is being tokenized
        slow.join()

        stats = async_engine.stats
        async_engine.stats = lambda: 1 / 0  # a bug in a route: the framework answers it
        r = client.get("/metrics")
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
        async_engine.stats = stats
        assert series(client.get("/metrics").text, "http_requests_total", handler="/metrics", status="500") == 1


# ---- servers ---------------------------------------------------------------------------------------
def events(r: httpx.Response) -> list:
    return [line[len("data: "):] for line in r.iter_lines() if line]


@pytest.mark.parametrize("where", [[], ["--engine-process"]], ids=["in-process", "engine-process"])
def test_step_fault_fails_its_request_and_a_fatal_fault_ends_the_server(where):
    proc, url, log = start_server("--max-model-len", "512", *where, script="faulty_server.py")
    try:
        ok = {"prompt": "hello", "max_tokens": 3}
        assert httpx.post(url + C, json=ok).status_code == 200
        r = httpx.post(url + C, json={"prompt": STEP_FAULT, "max_tokens": 3})
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["type"] == "internal_server_error" and "out of memory" in error["message"]
        with httpx.stream("POST", url + C, json={"prompt": STEP_FAULT, "max_tokens": 3, "stream": True}) as r:
            got = events(r)
        assert got[-1] == "[DONE]" and "out of memory" in json.loads(got[-2])["error"]["message"]
        assert httpx.post(url + C, json=ok).status_code == 200  # the engine serves on
        assert httpx.get(url + "/health").status_code == 200
        assert "error while streaming" not in read(log)  # answered as a failed step, not as a crash

        r = httpx.post(url + C, json={"prompt": FATAL_FAULT, "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert proc.wait(30) == 1  # ends by itself, never hangs on
        assert "the engine failed and cannot serve" in read(log) and "rank 1 exited" in read(log)
    finally:
        stop_server(proc)


def test_past_the_grace_period_requests_get_the_aborted_error_and_the_exit_is_clean():
    proc, url, log = start_server("--max-model-len", "4096", "--shutdown-timeout", "1")
    long = {"prompt": "never ending", "max_tokens": 4000, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def stream():
                async with client.stream("POST", C, json={**long, "stream": True}) as r:
                    return [line[len("data: "):] async for line in r.aiter_lines() if line]

            tasks = [asyncio.ensure_future(stream()), asyncio.ensure_future(client.post(C, json=long))]
            while series((await client.get("/metrics")).text, "num_requests_running") != 2:  # both are generating
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    try:
        streamed, plain = asyncio.run(main())
    finally:
        stop_server(proc)
    assert streamed[-1] == "[DONE]" and json.loads(streamed[-2])["error"]["code"] == "aborted"
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "aborted"
    assert proc.returncode == 0, read(log)
