# Run: python -m pytest -q tests/test_structured_outputs.py
"""Structured outputs on the shipped model: 50 schema-constrained requests batched with unconstrained
ones all parse and validate (jsonschema) while the unconstrained outputs stay what they are alone;
choice, regex and grammar hold; preemption and prefix caching keep outputs; grammars are compiled
once; an invalid grammar is refused naming the field; the bitmask applied by the sampler, on any device."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import numpy as np
import pytest
import torch

from deepseek_v2.engine.sequence import Sequence
from deepseek_v2.engine.sampler import Sampler
from deepseek_v2.sampling_params import InvalidRequestError, SamplingParams, StructuredOutputsParams as SO
from deepseek_v2.structured_outputs import GrammarCompiler, GrammarMasks, apply_token_bitmask


def make_schemas(n: int, seed: int = 0) -> list[dict]:
    """Object schemas with nested objects, arrays, enums, integers, numbers, booleans and required
    fields. Strings, arrays and integers are bounded so that a weak model's output always closes."""
    rng = random.Random(seed)
    leaves = [
        lambda: {"type": "string", "maxLength": rng.choice([8, 16, 24])},
        lambda: {"type": "integer", "minimum": 0, "maximum": rng.choice([10, 100, 5000])},
        lambda: {"type": "number", "minimum": -10, "maximum": 1000},
        lambda: {"type": "boolean"},
        lambda: {"enum": rng.sample(["red", "green", "blue", "small", "large", "yes", "no"], 3)},
        lambda: {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                 "maxItems": rng.choice([2, 4])},
        lambda: {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
    ]
    words = ["name", "age", "price", "color", "size", "tags", "ids", "active", "city", "score", "count", "label"]

    def obj(depth: int) -> dict:
        keys = rng.sample(words, rng.randint(2, 4))
        props = {k: obj(depth + 1) if depth < 2 and rng.random() < 0.25 else rng.choice(leaves)() for k in keys}
        required = set(rng.sample(keys, rng.randint(1, len(keys))))
        return {"type": "object", "properties": props, "required": [k for k in keys if k in required],
                "additionalProperties": False}

    schemas = []
    for i in range(n):
        s = obj(0)
        if i % 5 == 0:  # every fifth has a required nested object for sure
            s["properties"]["detail"] = obj(1)
            s["required"].append("detail")
        schemas.append(s)
    return schemas


def run(engine, requests: list[tuple[list[int] | str, SamplingParams]]) -> list:
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0]
    return [final[str(i)] for i in range(len(requests))]


def chat(engine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


PLAIN = SamplingParams(temperature=0, max_tokens=24)


def test_fifty_schemas_validate_mixed_with_unconstrained_requests(tiny_engine):
    schemas = make_schemas(50)
    engine = tiny_engine(max_num_seqs=64, num_kv_blocks=512, block_size=16)
    plain_prompts = [chat(engine, "What does len do?"), "The dictionary is a data structure that"]
    requests = [(chat(engine, f"Describe item {i} as JSON."),
                 SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=300,
                                structured_outputs=SO(json=s))) for i, s in enumerate(schemas)]
    outs = run(engine, requests + [(p, PLAIN) for p in plain_prompts])
    stopped = 0
    for schema, out in zip(schemas, outs):
        if out.finish_reason == "length":  # the grammar allows numbers of any length: a model may run on
            assert len(out.token_ids) == 300 and re.search(r"[0-9]{100}$", out.text), out.text
            continue
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
        stopped += 1
    assert stopped >= 45
    # Greedy output without a grammar is unchanged by the constrained requests beside it.
    alone = run(tiny_engine(), [(p, PLAIN) for p in plain_prompts])
    assert [o.token_ids for o in outs[50:]] == [o.token_ids for o in alone]


def test_choice_regex_grammar_and_json_object_hold(tiny_engine):
    engine = tiny_engine(max_num_seqs=16)
    prompt = chat(engine, "Is a list mutable?")
    choices = ["yes", "no", "it depends \"really\""]
    kinds = [SO(choice=choices), SO(regex=r"[0-9]{3}-[a-z]{2,5}"), SO(grammar='start: "x=" NUM ";"\nNUM: /[1-9][0-9]?/'),
             SO(grammar='root ::= "ab" [0-9] "!"'), SO(json_object=True)]
    requests = [(prompt, SamplingParams(temperature=t, seed=k, max_tokens=64, structured_outputs=so))
                for so in kinds for k, t in enumerate((0, 1.0, 1.5))]
    outs = run(engine, requests)
    for (_, params), out in zip(requests, outs):
        so, text = params.structured_outputs, out.text
        assert out.finish_reason == "stop", text
        if so.choice:
            assert text in choices
        elif so.regex:
            assert re.fullmatch(so.regex, text)
        elif so.json_object:
            assert isinstance(json.loads(text), dict)
        elif so.grammar.startswith("start"):
            assert re.fullmatch(r"x=[1-9][0-9]?;", text)
        else:
            assert re.fullmatch(r"ab[0-9]!", text)


SMALL = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 999},
                                          "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
         "required": ["name", "n", "tags"], "additionalProperties": False}


def test_preemption_and_prefix_caching_keep_constrained_outputs(tiny_engine):
    prompts = [chat(tiny_engine(), f"Describe thing {i} as JSON.") for i in range(3)]
    requests = [(p, SamplingParams(temperature=0, max_tokens=60, structured_outputs=SO(json=SMALL)))
                for p in prompts] * 2  # twice: the second time the prompts are cached
    reference = run(tiny_engine(enable_prefix_caching=False), requests)
    assert all(o.finish_reason == "stop" for o in reference)
    tight = tiny_engine(num_kv_blocks=8, block_size=16, max_model_len=128)  # six sequences take turns
    outs = run(tight, requests)
    assert tight.scheduler.num_preemptions > 0
    assert [o.text for o in outs] == [o.text for o in reference]
    cached = tiny_engine(block_size=8)
    first = run(cached, requests[:3])
    assert cached.block_manager.prefix_hits == 0
    again = run(cached, requests[3:])  # the prompts' blocks now come from the cache
    assert cached.block_manager.prefix_hits > 0
    assert [o.text for o in first + again] == [o.text for o in reference]


def test_grammars_are_compiled_once_and_invalid_ones_name_the_field(tiny_engine):
    engine = tiny_engine()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    first = engine.grammar_compiler.compile(SO(json=schema))
    assert engine.grammar_compiler.compile(SO(json=json.loads(json.dumps(schema)))) is first
    for bad, word in [(SO(json={"type": "frobnicate"}), "frobnicate"), (SO(regex="a(("), "unclosed group"),
                      (SO(grammar="start: missing_rule"), "missing_rule")]:
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request("bad", "hi", SamplingParams(structured_outputs=bad))
        assert e.value.param == "structured_outputs" and word in str(e.value)
    assert not engine.has_unfinished_requests()
    for kw, param in [(dict(structured_outputs=SO(regex="a", choice=["b"])), "structured_outputs"),
                      (dict(structured_outputs=SO(choice=[])), "structured_outputs"),
                      (dict(structured_outputs=SO(json=schema), ignore_eos=True), "ignore_eos")]:
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(**kw)
        assert e.value.param == param


def test_sampler_applies_the_bitmask_and_advances_the_matcher(tiny_engine):
    tok = tiny_engine().tokenizer
    masks = GrammarMasks(GrammarCompiler(tok, 4096))
    sampler = Sampler()
    sampler.grammars = masks
    constrained = Sequence([5], SamplingParams(temperature=0, structured_outputs=SO(choice=["yes", "no"])))
    plain = Sequence([5], SamplingParams(temperature=0))
    logits = torch.zeros(2, 4096)
    logits[:, tok.encode("maybe", add_special_tokens=False)[0]] = 10.0  # what the model wants
    sampler.prepare([constrained, plain])  # filled in the worker thread, taken by the sampler
    tokens = [t.token_id for t in sampler(logits, [constrained, plain])]
    assert tokens[1] == tok.encode("maybe", add_special_tokens=False)[0]
    word = tok.decode([tokens[0]])
    assert "yes".startswith(word) or "no".startswith(word)
    masked = masks.apply(logits, [constrained])  # after the matcher took that token
    allowed = torch.isfinite(masked[0]).nonzero().flatten().tolist()
    assert allowed and all(t == tok.eos_token_id or any(c.startswith(word + tok.decode([t])) for c in ("yes", "no"))
                           for t in allowed)
    sampler.release(constrained.seq_id)
    assert constrained.seq_id not in masks.matchers


def test_bitmask_application_follows_the_bits_on_any_device():
    """Bit t % 32 of word t // 32 allows token t, in the given rows only; the other rows are untouched.
    The meta device refuses any tensor made on another device, as CUDA does: code that runs there
    runs on a GPU too."""
    V, W = 70, 3  # a vocabulary that does not fill its last word
    rng = np.random.default_rng(0)
    bitmask = rng.integers(-2**31, 2**31, size=(2, W), dtype=np.int64).astype(np.int32)
    logits = torch.randn(3, V)
    masked = apply_token_bitmask(logits, bitmask, [0, 2])
    for row, words in ((0, bitmask[0]), (2, bitmask[1])):
        allowed = [bool((int(words[t // 32]) >> (t % 32)) & 1) for t in range(V)]
        assert torch.equal(torch.isfinite(masked[row]), torch.tensor(allowed))
        assert torch.equal(masked[row][allowed], logits[row][allowed])
    assert torch.equal(masked[1], logits[1]) and torch.isfinite(logits).all()  # a copy: the input is kept
    on_meta = apply_token_bitmask(logits.to("meta"), bitmask, [0, 2])
    assert on_meta.device.type == "meta" and on_meta.shape == logits.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bitmask_on_the_gpu_equals_the_cpu(tiny_engine):
    masks = GrammarMasks(GrammarCompiler(tiny_engine().tokenizer, 4096))
    seq = Sequence([5], SamplingParams(structured_outputs=SO(regex="[a-c]+x")))
    logits = torch.randn(1, 4096)
    assert torch.equal(masks.apply(logits.cuda(), [seq]).cpu(), masks.apply(logits, [seq]))
