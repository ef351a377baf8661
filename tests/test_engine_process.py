"""`serve --engine-process`: the engine in a process of its own (engine/engine_process.py). The same
answers as the engine in the server's process, requests refused by the same checks before they reach
the child, an abandoned stream aborted there, and a clean stop that takes the child with it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import openai
import pytest

from deepseek_v2 import LLM, SamplingParams
from server_process import read, series, start_server, stop_server


@pytest.fixture(scope="module")
def server():
    proc, url, log = start_server("--engine-process", "--num-kv-blocks", "128")
    yield proc, url, log
    stop_server(proc)


def test_greedy_answers_equal_the_engine_in_process(server):
    _, url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    prompts = ["The dictionary is a data structure that", "What does len do?"]
    served = [client.completions.create(model="deepseek-v2-default", prompt=p, max_tokens=12, temperature=0).choices[0].text
              for p in prompts]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="deepseek-v2-default", prompt=prompts[0], max_tokens=12, temperature=0, stream=True) if c.choices)
    llm = LLM(dtype="float32", device="cpu", num_kv_blocks=128)
    local = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))]
    assert served == local and streamed == local[0]
    # the sampling fields the engine process applies itself: a bias, bad words (tokenized there), a salt
    word = local[1].split()[0]
    kw = dict(temperature=0, max_tokens=12, logit_bias={5: 3.0}, bad_words=[word], cache_salt="s")
    served = client.completions.create(model="deepseek-v2-default", prompt=prompts[1], max_tokens=12, temperature=0,
                                       logit_bias={"5": 3.0}, extra_body={"bad_words": [word], "cache_salt": "s"})
    assert served.choices[0].text == llm.generate(prompts[1], SamplingParams(**kw))[0].outputs[0].text


def test_bad_requests_are_refused_before_the_engine_process(server):
    _, url, _ = server
    r = httpx.post(url + "/v1/completions", json={"model": "deepseek-v2-default", "prompt": [5000], "max_tokens": 2})
    assert r.status_code == 400 and "out of the vocabulary" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"model": "deepseek-v2-default", "prompt": [1] * 40000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_an_abandoned_stream_is_aborted_in_the_engine_process(server):
    _, url, _ = server
    body = {"model": "deepseek-v2-default", "prompt": "Once", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        next(r.iter_lines())  # one chunk, then the client goes away
    for _ in range(100):  # the engine process frees the sequence at its next step
        if series(httpx.get(url + "/metrics").text, "num_requests_running") == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the abandoned request still runs")
    generated = series(httpx.get(url + "/metrics").text, "generation_tokens_total")
    time.sleep(0.5)
    assert series(httpx.get(url + "/metrics").text, "generation_tokens_total") == generated


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c-to-the-group"])
def test_a_signal_stops_the_server_and_its_engine_process(ctrl_c):
    """SIGTERM to the server, or SIGINT to its whole process group (a terminal's Ctrl-C, which reaches the
    engine process too): the usual status (0, or 130 for the interrupt), no engine death reported, no
    process left."""
    proc, url, log = start_server("--engine-process", "--num-kv-blocks", "64", new_session=ctrl_c)
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
    assert children, "no engine process"
    if ctrl_c:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == (130 if ctrl_c else 0), read(log)  # 130: the shell's status for an interrupt
    assert "died" not in read(log)
    for _ in range(100):
        alive = [c for c in children if subprocess.run(["ps", "-p", str(c), "-o", "stat="], capture_output=True,
                                                       text=True).stdout.strip() not in ("", "Z")]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, f"engine process(es) {alive} outlived the server"


def test_structured_outputs_are_enforced_in_the_engine_process(server):
    """The grammar is checked in the server's process and applied in the engine's: a choice that the
    model would not write by itself comes back exactly, sampled or greedy."""
    _, url, _ = server
    choices = ["zebra crossing", "purple elephant"]
    for temperature in (0, 1.0):
        r = httpx.post(url + "/v1/completions", json={
            "model": "deepseek-v2-default", "prompt": "The dictionary is", "max_tokens": 20,
            "temperature": temperature, "structured_outputs": {"choice": choices}}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] in choices
