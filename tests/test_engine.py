# Run: python -m pytest -q tests/test_engine.py
"""The engine end to end on CPU: batched greedy output equals one-request-at-a-time generation
and transformers' greedy generate, whatever the engine settings; aborts, stop strings,
streaming, seeded sampling and prompt logprobs."""

import pytest
import torch

from deepseek_v2 import DeepseekV2ForCausalLM, EngineConfig, LLMEngine, SamplingParams, Tokenizer

TOKENIZER = "deepseek_v2/default_model"
NAME = "qlora-yarn-scaled"


@pytest.fixture(scope="module")
def setup(hf_checkpoint):
    hf, path = hf_checkpoint(NAME)
    model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(10)
    prompts = [torch.randint(2, 96, (n,)).tolist() for n in (3, 17, 40, 9, 66)]
    with torch.no_grad():
        hf_out = [hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    return model, tokenizer, prompts, hf_out


def run_all(engine: LLMEngine, prompts, params, ids=None):
    ids = ids or [str(i) for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return [final[r] for r in ids]


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("knobs", [
    dict(),
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=5),  # forces chunked prefill
    dict(long_prefill_token_threshold=7),  # chunks of each prompt beside the others and the decodes
    dict(max_num_batched_tokens=20, max_prefill_tokens_beside_decodes=6),  # prompts capped beside decodes
    dict(max_num_seqs=2),
])
def test_batched_greedy_equals_transformers(setup, knobs):
    model, tokenizer, prompts, hf_out = setup
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, **knobs))
    got = [o.outputs[0].token_ids for o in run_all(engine, prompts, GREEDY)]
    assert got == hf_out


def test_one_request_at_a_time_equals_transformers(setup):
    model, tokenizer, prompts, hf_out = setup
    single = []
    for p in prompts:  # one request at a time
        engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, max_num_seqs=1))
        single.append(run_all(engine, [p], GREEDY)[0].outputs[0].token_ids)
    assert single == hf_out


def test_preemption_keeps_outputs_unchanged(setup):
    model, tokenizer, prompts, hf_out = setup
    # 15 blocks of 8 tokens: the longest sequence (66 + 24 tokens) fits alone, not with the others
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, num_kv_blocks=15))
    got = [o.outputs[0].token_ids for o in run_all(engine, prompts, GREEDY)]
    assert engine.scheduler.num_preemptions > 0
    assert got == hf_out
    assert engine.block_manager.num_free_blocks == 15
    # prompt logprobs survive the recomputation: one entry per prompt token, same values
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=1)
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, num_kv_blocks=15))
    squeezed = run_all(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    roomy = run_all(LLMEngine(model, tokenizer, EngineConfig(block_size=8)), prompts, params)
    for a, b, p in zip(squeezed, roomy, prompts):
        assert len(a.prompt_logprobs) == len(p) and a.prompt_logprobs[0] is None
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-5 for t in x)


def test_prefix_cache_hits_reuse_blocks(setup):
    model, tokenizer, prompts, _ = setup
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8))
    shared = prompts[4][:48]
    first = run_all(engine, [shared + [5, 6]], GREEDY, ["a"])[0]
    second = run_all(engine, [shared + [7, 8, 9]], GREEDY, ["b"])[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 48
    fresh = LLMEngine(model, tokenizer, EngineConfig(block_size=8, enable_prefix_caching=False))
    assert run_all(fresh, [shared + [7, 8, 9]], GREEDY, ["c"])[0].outputs[0].token_ids == second.outputs[0].token_ids


def test_requests_join_midway_and_abort_frees_blocks(setup):
    model, tokenizer, prompts, hf_out = setup
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8))
    engine.add_request("long", prompts[2], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    engine.add_request("a", prompts[0], GREEDY)
    for _ in range(5):
        engine.step()
    engine.add_request("b", prompts[1], GREEDY)  # joins while the others decode
    done = {}
    steps = 0
    while "a" not in done or "b" not in done:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if steps == 10:
            assert engine.abort("long")
    assert done["a"] == hf_out[0] and done["b"] == hf_out[1]
    assert "long" not in done and not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.abort("unknown")


def test_stop_string_spanning_tokens_and_streaming(setup):
    model, tokenizer, prompts, _ = setup
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8))
    full = run_all(engine, [prompts[1]], GREEDY, ["x"])[0].outputs[0]
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in full.token_ids]
    # a stop string made of the text of tokens k and k + 1, appearing first there
    k = next(i for i in range(4, 20) if pieces[i] and pieces[i + 1]
             and (pieces[i] + pieces[i + 1]) not in "".join(pieces[:i + 1]))
    stop = pieces[k] + pieces[k + 1]
    expected = "".join(pieces[:k])
    assert full.text.startswith(expected + stop)
    engine.add_request("s", prompts[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    streamed, final = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed += out.outputs[0].delta_text
            final = out
    assert final.outputs[0].text == expected and streamed == expected
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == stop
    assert stop not in streamed


def test_stop_token_ids_and_max_tokens(setup):
    model, tokenizer, prompts, hf_out = setup
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8))
    stop_id = hf_out[3][6]
    out = run_all(engine, [prompts[3]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]))[0]
    first = hf_out[3].index(stop_id)
    assert out.outputs[0].token_ids == hf_out[3][: first + 1] and out.outputs[0].stop_reason == stop_id
    out = run_all(engine, [prompts[3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), ["m"])[0]
    assert out.outputs[0].token_ids == hf_out[3][:5] and out.outputs[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_across_batches(setup):
    model, tokenizer, prompts, _ = setup
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_tokens=16, seed=1234, ignore_eos=True)
    alone = run_all(LLMEngine(model, tokenizer), [prompts[1]], params)[0].outputs[0].token_ids
    other = SamplingParams(temperature=0.7, max_tokens=10, ignore_eos=True)
    engine = LLMEngine(model, tokenizer)
    engine.add_request("o1", prompts[0], other)
    engine.add_request("o2", prompts[2], other)
    mixed = run_all(engine, [prompts[1]], params, ["s"])[0].outputs[0].token_ids
    assert mixed == alone
    different = run_all(LLMEngine(model, tokenizer), [prompts[1]],
                        SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_tokens=16, seed=99, ignore_eos=True))
    assert different[0].outputs[0].token_ids != alone
    # n > 1 with a seed: distinct samples, reproducible as a whole
    many = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    a = [c.token_ids for c in run_all(LLMEngine(model, tokenizer), [prompts[0]], many)[0].outputs]
    b = [c.token_ids for c in run_all(LLMEngine(model, tokenizer), [prompts[0]], many)[0].outputs]
    assert a == b and len({tuple(x) for x in a}) == 3


def test_top_k_one_equals_greedy(setup):
    model, tokenizer, prompts, hf_out = setup
    out = run_all(LLMEngine(model, tokenizer), prompts[:3],
                  SamplingParams(temperature=1.3, top_k=1, max_tokens=24, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in out] == hf_out[:3]


def test_logprobs_match_reference_log_softmax(setup, hf_checkpoint):
    model, tokenizer, prompts, hf_out = setup
    hf, _ = hf_checkpoint(NAME)
    prompt = prompts[2]
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_batched_tokens=16))  # chunked prompt scoring
    out = run_all(engine, [prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                   prompt_logprobs=3, logprobs=2))[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + hf_out[2][:4]])).logits[0].float().log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entry = out.prompt_logprobs[i]
        assert abs(entry[prompt[i]] - ref[i - 1, prompt[i]].item()) < 1e-4
        top = ref[i - 1].topk(3)
        for t, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(entry[t] - lp) < 1e-4
    gen = out.outputs[0]
    for j, tok in enumerate(gen.token_ids):
        assert abs(gen.logprobs[j][tok] - ref[len(prompt) - 1 + j, tok].item()) < 1e-4
        assert len(gen.logprobs[j]) <= 3
    assert abs(gen.cumulative_logprob - sum(gen.logprobs[j][t] for j, t in enumerate(gen.token_ids))) < 1e-5


def test_bad_prompts_raise(setup):
    model, tokenizer, _, _ = setup
    engine = LLMEngine(model, tokenizer, EngineConfig(max_model_len=64))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], GREEDY)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        engine.add_request("v", [1, 96], GREEDY)
    with pytest.raises(ValueError, match="context length"):
        engine.add_request("l", list(range(2, 66)), GREEDY)
    engine.add_request("ok", [2, 3], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", [2, 3], GREEDY)


@pytest.mark.parametrize("name, fp8, quantize_once", [("qlora-yarn-scaled", False, False),
                                                      ("qlora-plain-grouped", False, False),
                                                      ("qlora-yarn-scaled", True, False),
                                                      ("qlora-yarn-scaled", True, True)])
def test_triton_kernel_set_equals_the_reference(hf_checkpoint, interpreted_kernels, name, fp8, quantize_once,
                                                monkeypatch):
    """The engine with kernels="triton" (the Triton kernels, run here by Triton's CPU interpreter) gives
    the reference set's greedy tokens: the one switch flips every kernel family and nothing else. The
    grouped case covers group-limited routing, which has no kernel (the Triton set uses the reference);
    the FP8 case FP8 weights (the FP8 GEMM and the fused MoE's FP8 path, every block partial at these
    sizes) and the FP8 latent cache (its write in mla_prepare, its reads in decode and prefill). With
    quantize_once, the 256-sequence levers at these few tokens: inputs of the FP8 GEMMs quantized once
    (fp8.QUANTIZE_ONCE_FROM: by the input norm for the first projection, by the router in blocks of tokens,
    router.ROUTE_BLOCKS_MAX_TOKENS, for the routed and the shared experts, by the activation for the down
    projection), the FP8 GEMM reading x quantized past 2 rows."""
    if quantize_once:
        from deepseek_v2.kernels import fp8 as fp8_formats
        from deepseek_v2.moe import MoE
        for owner, setting, value in [(fp8_formats, "QUANTIZE_ONCE_FROM", 3), (MoE, "FUSED_SHARED_MAX_TOKENS", 2),
                                      (interpreted_kernels.router, "ROUTE_MAX_TOKENS", 2),
                                      (interpreted_kernels.router, "ROUTE_BLOCKS_MAX_TOKENS", 16),
                                      (interpreted_kernels.fp8_linear, "FUSED_MAX_M", 2)]:
            monkeypatch.setattr(owner, setting, value)
    _, path = hf_checkpoint(name)
    tokenizer = Tokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(11)
    prompts = [torch.randint(2, 96, (n,)).tolist() for n in (5, 21)]  # 21 > 16: a chunked prefill
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outputs = {}
    for kernels in ("reference", "triton"):  # a model each: the engine sets the model's kernel set
        model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32, quantization="fp8" if fp8 else None)
        engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, max_num_batched_tokens=16, kernels=kernels,
                                                          kv_cache_dtype="fp8" if fp8 else "auto"))
        assert {type(m).__name__: m.kernels.name for m in model.modules() if "kernels" in vars(m)} == {
            "RMSNorm": kernels, "MLA": kernels, "MLP": kernels, "MoEGate": kernels, "RoutedExperts": kernels,
            "Linear": kernels, "ShardedLinear": kernels}
        assert (model.model.layers[-1].mlp.experts.down_proj.dtype == torch.float8_e4m3fn) == fp8
        assert (engine.runner.kv_caches[0].dtype == torch.uint8) == fp8
        outputs[kernels] = [o.outputs[0].token_ids for o in run_all(engine, prompts, params)]
    assert outputs["triton"] == outputs["reference"]


def test_bad_requests_name_their_parameter(setup):
    from deepseek_v2 import InvalidRequestError
    model, tokenizer, prompts, _ = setup
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, max_model_len=64))
    for prompt, params, param in [
        ([], GREEDY, "prompt"),
        ([3, 96], GREEDY, "prompt"),                                   # out of the vocabulary (96 tokens)
        (list(range(2, 66)), GREEDY, "prompt"),                        # no room left for output
        ([3, 4], SamplingParams(stop_token_ids=[500]), "stop_token_ids"),
    ]:
        with pytest.raises(InvalidRequestError) as info:
            engine.add_request("bad", prompt, params)
        assert info.value.param == param
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("budget, window", [(24, None), (7, None), (24, 1)])
def test_piecewise_steps_equal_transformers(setup, budget, window):
    """The step cut at attention (engine/piecewise.py), run eagerly over its static buffers as the CUDA
    graphs run it: mixed prefill and decode steps, chunked prompts, padded token counts and a prefix-cache
    hit give transformers' tokens. The decode rows attend inside the pieces, or (window 1: a step of
    several decodes) eagerly beside the prefills."""
    model, tokenizer, prompts, hf_out = setup
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, max_num_batched_tokens=budget))
    runner = engine.runner
    runner.piecewise = pieces = runner.piecewise_steps(capture=False)
    if window is not None:
        pieces.window = window
    sizes, in_pieces = [], []
    run = pieces.run
    pieces.run = lambda ids, *rest: (sizes.append(len(ids)), in_pieces.append(pieces.takes_decodes(len(ids), len(rest[5]))),
                                     run(ids, *rest))[-1]
    got = [o.outputs[0].token_ids for o in run_all(engine, prompts, GREEDY)]
    assert got == hf_out
    assert any(t not in pieces.counts for t in sizes), "no step was padded"  # padding rows were exercised
    assert True in in_pieces and (window is None) == all(in_pieces)  # which way the decode rows attended
    # a prefix hit: the second request's prefill attends to cached blocks through the pieces
    shared = prompts[4][:48]
    run_all(engine, [shared + [5, 6]], GREEDY, ["a"])
    second = run_all(engine, [shared + [7, 8, 9]], GREEDY, ["b"])[0]
    assert second.num_cached_tokens == 48
    fresh = LLMEngine(model, tokenizer, EngineConfig(block_size=8, enable_prefix_caching=False))
    assert run_all(fresh, [shared + [7, 8, 9]], GREEDY, ["c"])[0].outputs[0].token_ids == second.outputs[0].token_ids


@pytest.mark.parametrize("budget", [None, 24, 7])
def test_prompt_chunks_run_absorbed_equal_transformers(setup, monkeypatch, budget):
    """Prompt chunks run in absorbed form as decode rows (ModelRunner.absorbs_prefill: what lets a
    step with short prompts be one CUDA graph on a GPU), here turned on on the CPU: whole prompts,
    chunked prompts beside decodes, a cost bound that sends the larger steps the expanded way, a
    prefix-cache hit and prompt logprobs give what the expanded path gives."""
    from deepseek_v2.engine import model_runner

    model, tokenizer, prompts, hf_out = setup
    knobs = dict(max_num_seqs=2) if budget is None else dict(max_num_batched_tokens=budget)
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, **knobs))
    runner = engine.runner
    runner.absorbed_prefill_max_rows = 4096
    # a step holding the whole 66-token prompt stays expanded (ABSORBED_PREFILL_MAX_TOKENS), and with
    # chunks, one whose reads pass this bound
    heads = model.model.layers[0].self_attn.num_heads
    monkeypatch.setattr(model_runner, "ABSORBED_PREFILL_ROW_HEADS", 1000 * heads)
    chosen = []
    absorbs = runner.absorbs_prefill
    runner.absorbs_prefill = lambda items: chosen.append(absorbs(items)) or chosen[-1]
    got = [o.outputs[0].token_ids for o in run_all(engine, prompts, GREEDY)]
    assert got == hf_out
    assert True in chosen, "no step ran its prompt chunks absorbed"
    if budget is None:
        assert False in chosen, "every step ran absorbed: the cost bound was not exercised"
    # a prefix hit: the new tokens' queries attend to the cached blocks as decode rows
    shared = prompts[4][:48]
    run_all(engine, [shared + [5, 6]], GREEDY, ["a"])
    chosen.clear()
    second = run_all(engine, [shared + [7, 8, 9]], GREEDY, ["b"])[0]
    assert second.num_cached_tokens == 48 and chosen[0]
    fresh = LLMEngine(model, tokenizer, EngineConfig(block_size=8, enable_prefix_caching=False))
    assert run_all(fresh, [shared + [7, 8, 9]], GREEDY, ["c"])[0].outputs[0].token_ids == second.outputs[0].token_ids
    # prompt logprobs: rows of the absorbed chunks, gathered among the logits
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2, logprobs=2)
    absorbed = run_all(engine, prompts[:2], params, ["p0", "p1"])
    expanded = run_all(fresh, prompts[:2], params, ["q0", "q1"])
    for a, b in zip(absorbed, expanded):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.prompt_logprobs[1:] + a.outputs[0].logprobs, b.prompt_logprobs[1:] + b.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)


def test_start_up_warm_up_steps_are_well_formed_and_leave_no_trace(setup):
    """The steps a GPU runner runs once at start-up (shapes the graph capture does not compile): here
    on the CPU, their prompts' logits equal a plain forward of each prompt, and requests served after
    them still give transformers' tokens (their cache writes land where sequences write first)."""
    model, tokenizer, prompts, hf_out = setup
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, max_num_batched_tokens=40, max_num_seqs=4))
    runner = engine.runner
    assert runner._split_prompts(40) == [40] and runner._split_prompts(2 * runner.max_model_len + 5) == [
        runner.max_model_len, runner.max_model_len, 5]
    logits = runner.forward(runner._dummy_step([5, 11], 3, 19))
    assert logits.shape[0] == 2 + 3  # each prompt's last row, then the decodes
    with torch.no_grad():
        for row, n in enumerate((5, 11)):
            expected = model(torch.zeros(1, n, dtype=torch.long))[0, -1]
            torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)
    # a chunk after cached tokens (the warm-up's long-context step): its keys end with the slots it writes
    chunk = runner._dummy_step([6], 0, 1, cached=9)
    assert chunk.prefill_key_lens == [15] and chunk.positions.tolist() == list(range(9, 15))
    assert chunk.prefill_key_slots[-6:].tolist() == chunk.slots.tolist()  # the new tokens' keys are what they write
    assert torch.isfinite(runner.forward(chunk)).all()
    runner._warm_up_steps()
    assert [o.outputs[0].token_ids for o in run_all(engine, prompts, GREEDY)] == hf_out


def test_dummy_load_format_is_random_weights_of_the_checkpoints_shape():
    """load_format="dummy" (vLLM's): the checkpoint's architecture and tokenizer, random weights."""
    from deepseek_v2.config import DEFAULT_MODEL
    real = DeepseekV2ForCausalLM.from_pretrained(DEFAULT_MODEL)
    engine = LLMEngine.from_pretrained(load_format="dummy", dtype="float32", num_kv_blocks=4)
    assert engine.model.args == real.args and engine.tokenizer.vocab_size == Tokenizer.from_pretrained(DEFAULT_MODEL).vocab_size
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    dummy, loaded = dict(engine.model.named_parameters())[name], dict(real.named_parameters())[name]
    assert dummy.shape == loaded.shape and not torch.equal(dummy, loaded)
    with pytest.raises(ValueError, match="load_format"):
        LLMEngine.from_pretrained(load_format="pt")


def test_max_model_len_above_the_model_is_lowered_with_a_warning(tiny_engine, caplog):
    with caplog.at_level("WARNING", logger="deepseek_v2"):
        engine = tiny_engine(max_model_len=1_000_000, num_kv_blocks=512)
    limit = engine.model.args.max_position_embeddings
    assert engine.max_model_len == limit
    assert f"max_model_len 1000000 is above the model's limit (max_position_embeddings {limit})" in caplog.text


def test_dummy_checkpoint_script_writes_a_servable_shape(tmp_path):
    """scripts/dummy_checkpoint.py: V2-Lite's shape with the shipped tokenizer's vocabulary, no weights."""
    import importlib.util
    from dataclasses import replace
    from deepseek_v2.config import PRESETS, ModelArgs
    from pathlib import Path
    path = Path(__file__).parent.parent / "scripts" / "dummy_checkpoint.py"
    spec = importlib.util.spec_from_file_location("dummy_checkpoint", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.write_dummy_checkpoint(tmp_path / "lite")
    args = ModelArgs.from_pretrained(out)
    tokenizer = Tokenizer.from_pretrained(out)
    assert args == replace(PRESETS["v2-lite"], vocab_size=args.vocab_size, bos_token_id=args.bos_token_id,
                           eos_token_id=args.eos_token_id)
    assert len(tokenizer) <= args.vocab_size < PRESETS["v2-lite"].vocab_size
    assert not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("max_num_seqs, piecewise, budget", [(None, False, None), (3, False, None), (None, True, None),
                                                             (None, False, 20)])
def test_steps_launched_ahead_equal_the_synchronous_engine(setup, max_num_seqs, piecewise, budget):
    """Asynchronous scheduling (each step after a decode step launched before the last one's tokens
    reach the host, with the prompts admitted meanwhile) gives every request what the engine gives
    without it: the same tokens, text, streamed deltas and finish reasons, with sequences ending by
    max_tokens, max_model_len, a stop token or a stop string inside a chain of steps launched ahead,
    requests joining (in steps launched ahead, or, with 3 sequences at most, waiting while a full
    batch decodes) and aborted midway, seeded sampling with n = 2, and a request with logprobs
    (sampled on the host, so it is admitted by a step scheduled then). With piecewise, the steps
    holding prompts run through the pieces of engine/piecewise.py (eagerly, as on a GPU without
    capture), their decode rows' tokens read on the device. With a budget of 20 tokens a step the
    prompts come in chunks, and the second sample of "seeded" starts from the blocks its first fills
    in the step in flight (the prefix cache), in the same step as without asynchronous scheduling."""
    model, tokenizer, prompts, hf_out = setup
    probe = run_all(LLMEngine(model, tokenizer, EngineConfig(block_size=8)), [prompts[1]], GREEDY, ["p"])[0]
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in probe.outputs[0].token_ids]
    k = next(i for i in range(6, 20) if pieces[i] and pieces[i] not in "".join(pieces[:i]))
    plan = {  # step -> what happens before it
        0: [("add", "greedy", prompts[0], GREEDY),
            ("add", "short", prompts[1], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)),
            ("add", "stop-token", prompts[3], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[hf_out[3][9]])),
            ("add", "stop-string", prompts[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                               stop=[pieces[k]])),
            ("add", "model-len", prompts[4], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)),
            ("add", "seeded", prompts[2], SamplingParams(n=2, temperature=0.9, top_p=0.9, max_tokens=20, seed=5,
                                                         ignore_eos=True))],
        7: [("add", "late", prompts[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))],
        11: [("abort", "seeded")],
        14: [("add", "logprobs", prompts[3], SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True))],
    }

    def serve(async_scheduling):
        knobs = {} if budget is None else dict(max_num_batched_tokens=budget)
        engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, max_model_len=80, max_num_seqs=max_num_seqs,
                                                          async_scheduling=async_scheduling, **knobs))
        if piecewise:
            engine.runner.piecewise = engine.runner.piecewise_steps(capture=False)
        streams: dict[str, list] = {}
        step = 0
        while step in plan or engine.has_unfinished_requests() or step < max(plan):
            for action in plan.get(step, []):
                if action[0] == "add":
                    engine.add_request(*action[1:])
                else:
                    engine.abort(action[1])
            for out in engine.step():
                streams.setdefault(out.request_id, []).append(
                    [(c.index, c.delta_text, list(c.delta_token_ids), c.finish_reason, c.stop_reason)
                     for c in out.outputs])
            step += 1
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        stats = engine.stats()
        return streams, stats["steps_launched_ahead"], stats["steps_launched_ahead_with_prompts"]

    expected, none_ahead, _ = serve("off")
    got, ahead, with_prompts = serve("on")
    assert none_ahead == 0 and ahead > 10
    assert with_prompts >= 1  # ("logprobs" is never admitted ahead: its logprobs need the host)
    assert got == expected
    final = {rid: chunks[-1] for rid, chunks in expected.items()}
    assert final["short"][0][3] == "length" and final["stop-token"][0][4] == hf_out[3][9]
    assert final["stop-string"][0][4] == pieces[k] and final["model-len"][0][3] == "length"
    assert max_num_seqs or final["seeded"][0][3] is None  # aborted after it streamed (it waits, with 3)
    assert sum(len(c[0][2]) for c in expected["model-len"]) == 80 - len(prompts[4])


def test_prompts_admitted_ahead_in_chunks_with_prefix_hits_and_aborted(setup):
    """Prompts admitted by a step launched ahead: two at once under a small token budget (the second's
    first chunk, then its next chunks in the steps launched after it, beside decodes of the tokens the
    step before sampled), one that hits the prefix cache of a finished request, and one aborted while
    the step that admitted it is in flight: every other request gets transformers' tokens, and every
    block is free at the end."""
    model, tokenizer, prompts, hf_out = setup
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, max_num_batched_tokens=24, async_scheduling="on"))
    final = {}

    def step():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids

    def step_until_a_decode_step_is_ahead():
        while engine._ahead is None or not engine._ahead.step.forward.decode_only:
            step()

    def ahead_requests():
        return {item.seq.request_id: item.num_new_tokens for item in engine._ahead.step.items}

    engine.add_request("0", prompts[0], GREEDY)
    step_until_a_decode_step_is_ahead()
    engine.add_request("1", prompts[1], GREEDY)  # 17 tokens
    engine.add_request("4", prompts[4], GREEDY)  # 66 tokens: 6 of them fit beside "0" and "1"
    step()
    assert ahead_requests() == {"0": 1, "1": 17, "4": 6}
    step()  # the step after it, launched ahead too: two decodes on its tokens, the next chunk of "4"
    assert ahead_requests() == {"0": 1, "1": 1, "4": 22}
    while "1" not in final:
        step()
    step_until_a_decode_step_is_ahead()
    engine.add_request("1b", prompts[1], GREEDY)  # 16 of its 17 tokens cached: one left, run as a decode row
    engine.add_request("2", prompts[2], GREEDY)  # 40 tokens: a first chunk
    step()
    admitted = ahead_requests()
    assert admitted["1b"] == 1 and 1 < admitted["2"] < len(prompts[2])
    engine.abort("2")  # while the step that admitted it is in flight
    while engine.has_unfinished_requests():
        step()
    assert [final[r] for r in ("0", "1", "4", "1b")] == [hf_out[0], hf_out[1], hf_out[4], hf_out[1]]
    assert "2" not in final and engine.stats()["steps_launched_ahead_with_prompts"] >= 2
    assert engine.block_manager.prefix_hits >= 16
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def random_traffic(seed: int):
    """Engine knobs and a plan (step -> adds and aborts) of random requests: prompts that share prefixes,
    greedy, seeded with n = 2, with logprobs or prompt logprobs (those two sampled on the host)."""
    import random

    rng = random.Random(seed)
    knobs = dict(block_size=8, num_kv_blocks=rng.choice([24, 64, 200]), max_num_batched_tokens=rng.choice([16, 40, 512]),
                 max_num_seqs=rng.choice([2, 4, 16]), max_model_len=rng.choice([96, 192]),
                 long_prefill_token_threshold=rng.choice([0, 0, 12]),
                 max_prefill_tokens_beside_decodes=rng.choice([None, None, 10]))
    shared = [rng.randrange(10, 4000) for _ in range(24)]
    plan: dict[int, list] = {}
    for i in range(rng.randint(4, 10)):
        prompt = shared[:rng.choice([0, 16, 24])] + [rng.randrange(10, 4000) for _ in range(rng.randint(1, 60))]
        kind = rng.random()
        if kind < 0.6:
            params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True)
        elif kind < 0.8:
            params = SamplingParams(n=rng.choice([1, 2]), temperature=0.9, top_p=0.9, seed=rng.randint(0, 99),
                                    max_tokens=rng.randint(1, 20), ignore_eos=True)
        elif kind < 0.9:
            params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 10), logprobs=1, ignore_eos=True)
        else:
            params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 10), prompt_logprobs=1, ignore_eos=True)
        step = rng.randint(0, 30)
        plan.setdefault(step, []).append(("add", f"r{i}", prompt[:knobs["max_model_len"] - 2], params))
        if rng.random() < 0.15:
            plan.setdefault(step + rng.randint(1, 5), []).append(("abort", f"r{i}"))
    return knobs, plan


def test_random_traffic_launched_ahead_equals_the_synchronous_engine(tiny_engine):
    """Asynchronous scheduling over random traffic (the shipped model): requests arriving at random
    steps, small caches that preempt, small budgets that chunk, prefix hits, requests sampled on the host
    between others: every request that is not aborted gets the synchronous engine's tokens and finish
    reason for each of its samples, and every block is free at the end (aborts included)."""
    launched_with_prompts = 0
    for seed in range(12):
        knobs, plan = random_traffic(seed)
        aborted = {action[1] for actions in plan.values() for action in actions if action[0] == "abort"}

        def serve(mode):
            engine = tiny_engine(async_scheduling=mode, **knobs)
            samples: dict[tuple, list] = {}
            step = 0
            while step <= max(plan) or engine.has_unfinished_requests():
                for action in plan.get(step, []):
                    engine.add_request(*action[1:]) if action[0] == "add" else engine.abort(action[1])
                for out in engine.step():
                    for c in out.outputs:
                        tokens, finish = samples.setdefault((out.request_id, c.index), ([], []))
                        tokens.extend(c.delta_token_ids)
                        finish[:] = [c.finish_reason] if c.finish_reason else finish
                step += 1
            assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
            kept = {key: value for key, value in samples.items() if key[0] not in aborted}
            return kept, engine.stats()["steps_launched_ahead_with_prompts"]

        expected, _ = serve("off")
        got, with_prompts = serve("on")
        assert got == expected, seed
        launched_with_prompts += with_prompts
    assert launched_with_prompts > 10


def test_async_scheduling_is_refused_where_other_ranks_need_each_steps_inputs(setup):
    """A tensor-parallel rank 0 sends every step's inputs to the other ranks from the host: a step launched
    ahead would read its tokens on the device only, so "on" is refused and "auto" stays off."""
    model, tokenizer, _, _ = setup
    control = object()  # rank 0's channel to the other ranks (unused with a fixed cache size)
    with pytest.raises(ValueError, match="async_scheduling needs the engine in one process"):
        LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=16, async_scheduling="on"), control=control)
    assert not LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=16), control=control).async_scheduling
    assert LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=16, async_scheduling="on")).async_scheduling


def test_a_step_launched_ahead_whose_requests_were_all_aborted_is_waited_for_and_dropped(setup):
    model, tokenizer, prompts, hf_out = setup
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=8, async_scheduling="on"))
    for rid, p in (("a", prompts[0]), ("b", prompts[1])):
        engine.add_request(rid, p, GREEDY)
    for _ in range(4):
        engine.step()
    assert engine._ahead is not None
    engine.abort("a"), engine.abort("b")
    assert not engine.has_unfinished_requests()
    assert run_all(engine, [prompts[2]], GREEDY)[0].outputs[0].token_ids == hf_out[2]
    assert engine._ahead is None and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
