"""Structured outputs, measured (figures in docs/benchmarks.md):

1. the grammar engines on one tokenizer: llguidance (what the engine uses) and xgrammar when it is
   installed: making the tokenizer's tables, compiling a nested JSON schema, and the token mask per
   generated token while walking a valid document;
2. the engine on the shipped model: decode steps of a batch without any grammar, with half the
   batch constrained, and with all of it constrained; run it on the commit before structured
   outputs too (`--plain-only`, with that commit's package first on PYTHONPATH) to see that requests
   without a grammar pay nothing; and, timed on their own, the calls structured outputs added to a
   step without grammars.

    python scripts/bench_grammar.py [--tokenizer DIR] [--batch 16] [--tokens 48] [--repeats 5] [--plain-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "score": {"type": "number"}, "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                "required": ["street", "city"], "additionalProperties": False}},
    "required": ["name", "age", "role", "address"], "additionalProperties": False}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "score": 9.5, "role": "admin", "tags": ["math", "engines"],
            "address": {"street": "12 St James's Square", "city": "London"}}


def grammar_engines(tokenizer_dir: str) -> None:
    import numpy as np

    from deepseek_v2.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    ids = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False) + [tok.eos_token_id]
    print(f"tokenizer {tokenizer_dir}: {vocab} tokens; document of {len(ids)} tokens")

    import llguidance
    import llguidance.numpy as lnp
    t = time.perf_counter()
    lt = llguidance.LLTokenizer(tok.backend_json(), n_vocab=vocab, eos_token=tok.eos_token_id)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False}))
    compile_ms = 1e3 * (time.perf_counter() - t)
    mask, times = lnp.allocate_token_bitmask(1, vocab), []
    for tid in ids:
        t = time.perf_counter()
        lnp.fill_next_token_bitmask(m, mask, 0)
        times.append(time.perf_counter() - t)
        assert m.consume_token(tid), m.get_error()
    print(f"  llguidance {llguidance.get_version() if hasattr(llguidance, 'get_version') else ''}: tables "
          f"{1e3 * setup:.1f} ms, compile {compile_ms:.2f} ms, mask {1e6 * statistics.mean(times):.1f} us/token "
          f"(median {1e6 * statistics.median(times):.1f}, max {1e6 * max(times):.0f})")
    try:
        import xgrammar as xgr
    except ImportError:
        print("  xgrammar: not installed (pip install xgrammar to compare)")
        return
    t = time.perf_counter()
    info = xgr.TokenizerInfo([tok.convert_ids_to_tokens(i) or "" for i in range(vocab)], xgr.VocabType.BYTE_LEVEL,
                             vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
    compiler = xgr.GrammarCompiler(info)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_ms = 1e3 * (time.perf_counter() - t)
    matcher, mask, times = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, vocab), []
    for tid in ids:
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - t)
        assert matcher.accept_token(tid)
    print(f"  xgrammar {xgr.__version__ if hasattr(xgr, '__version__') else ''}: tables {1e3 * setup:.1f} ms, "
          f"compile {compile_ms:.2f} ms, mask {1e6 * statistics.mean(times):.1f} us/token "
          f"(median {1e6 * statistics.median(times):.1f}, max {1e6 * max(times):.0f})")
    del np


def engine_steps(batch: int, tokens: int, plain_only: bool, repeats: int) -> None:
    from deepseek_v2.engine.llm_engine import LLMEngine
    from deepseek_v2.sampling_params import SamplingParams
    engine = LLMEngine.from_pretrained(dtype="float32", device="cpu", num_kv_blocks=256)
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": f"Describe person {i} as JSON."}],
                                                    add_generation_prompt=True) for i in range(batch)]

    def params(constrained: bool) -> SamplingParams:
        if not constrained:
            return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        from deepseek_v2.sampling_params import StructuredOutputsParams
        # a list of at least 8 such objects: no constrained row ends before `tokens`, so every step has
        # the whole batch, as the unconstrained rows (ignore_eos) have
        many = {"type": "array", "items": SCHEMA, "minItems": 8}
        return SamplingParams(temperature=0, max_tokens=tokens, structured_outputs=StructuredOutputsParams(json=many))

    grammar_s = [0.0]  # time in the grammar work on the step's path: the masks' wait and application, the matchers' advance

    def timed(fn):
        def wrapper(*a):
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                grammar_s[0] += time.perf_counter() - t
        return wrapper

    def run(n_constrained: int) -> tuple[list[float], list[float]]:
        """ms per decode step (the prefill step left out) and ms of it in grammar work, one figure per run."""
        per_run, grammar_per_run = [], []
        for r in range(repeats):
            for i, p in enumerate(prompts):
                engine.add_request(f"{n_constrained}-{r}-{i}", p, params(i < n_constrained))
            masks = getattr(engine.runner.sampler, "grammars", None)
            if masks is not None and not hasattr(masks, "timed"):
                masks.apply, masks.accept, masks.timed = timed(masks.apply), timed(masks.accept), True
            engine.step()  # the prefill
            t, steps, grammar_s[0] = time.perf_counter(), 0, 0.0
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
            per_run.append(1e3 * (time.perf_counter() - t) / max(steps, 1))
            grammar_per_run.append(1e3 * grammar_s[0] / max(steps, 1))
        return per_run, grammar_per_run

    cases = [0] if plain_only else [0, batch // 2, batch]
    for n in cases:
        ms, grammar_ms = run(n)
        print(f"  batch {batch}, {n} constrained: {min(ms):.2f} ms per decode step (best of {repeats}; median "
              f"{statistics.median(ms):.2f}); of which grammar work on the step's path {statistics.median(grammar_ms):.2f}")
    if hasattr(engine.runner.sampler, "prepare"):
        added_cost(engine, prompts)


def added_cost(engine, prompts: list[list[int]], calls: int = 20000) -> None:
    """What structured outputs added to a step in which no request has a grammar, timed on its own
    (a step's figure above moves by more than this from run to run): the runner's one call of
    sampler.prepare, and the sampler's plain-greedy test of every row (one more `is None` in it)."""
    from deepseek_v2.engine.sequence import Sequence
    from deepseek_v2.sampling_params import SamplingParams
    seqs = [Sequence(p, SamplingParams(temperature=0)) for p in prompts]
    sampler = engine.runner.sampler
    t = time.perf_counter()
    for _ in range(calls):
        sampler.prepare(seqs)
    prepare_us = 1e6 * (time.perf_counter() - t) / calls
    t = time.perf_counter()
    for _ in range(calls):
        all(s.sampling_params.plain_greedy for s in seqs)
    test_us = 1e6 * (time.perf_counter() - t) / calls
    print(f"  without grammars, per step of {len(seqs)} rows: sampler.prepare {prepare_us:.2f} us; the "
          f"plain-greedy test of the rows (all of it, not only the added term) {test_us:.2f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="deepseek_v2/default_model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5, help="runs of each batch")
    p.add_argument("--plain-only", action="store_true", help="only the batch without grammars (runs on any commit)")
    args = p.parse_args()
    if not args.plain_only:
        grammar_engines(args.tokenizer)
    print("engine on the shipped model (CPU, float32):")
    engine_steps(args.batch, args.tokens, args.plain_only, args.repeats)


if __name__ == "__main__":
    main()
