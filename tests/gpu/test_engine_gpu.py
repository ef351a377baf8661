# Run on a CUDA machine: pytest -q tests/gpu/test_engine_gpu.py  (skipped without a GPU)
"""The engine on the GPU (Triton MLA decode and fused MoE, CUDA graphs) against the reference path
(PyTorch on the CPU), greedy, token for token; and with every performance switch off."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from deepseek_v2 import DeepseekV2ForCausalLM, EngineConfig, LLMEngine, ModelArgs, SamplingParams, Tokenizer  # noqa: E402
from deepseek_v2.config import RopeScaling  # noqa: E402
from deepseek_v2.parallel import SINGLE  # noqa: E402

TOKENIZER = "deepseek_v2/default_model"


def model_args(**changes):
    # the real MLA head dims (R=512, P=64, 16 heads of 128 + 64), small everything else
    base = dict(vocab_size=512, hidden_size=256, num_hidden_layers=3, intermediate_size=512,
                num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16, num_experts_per_tok=4,
                n_shared_experts=2, moe_intermediate_size=128, first_k_dense_replace=1,
                max_position_embeddings=4096, rope_scaling=RopeScaling(40.0, 256, 32, 1, 0.707, 0.707),
                initializer_range=0.08, bos_token_id=0, eos_token_id=1)
    return ModelArgs(**{**base, **changes})


def run(engine, prompts, params, result=lambda completion: completion.token_ids):
    """Each prompt's result (of its first completion: its tokens unless `result` says otherwise), in order."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = result(o.outputs[0])
    return [done[str(i)] for i in range(len(prompts))]


# the kernel settings the other way from their defaults (README): the engine must still give the reference's
# tokens (prefill attention by the reference in fp32 rather than our kernel, the grouped router by the reference)
SETTINGS_ON = [("prefill", "TRITON_FROM_KEYS", None), ("moe", "COMBINE_IN_GEMM_MAX_TOKENS", 64),
               ("moe", "SWAP_AB_MAX_BLOCK_M", 32), ("mla_decode", "PROJECT_IN_MERGE_MAX_SEQS", 8),
               ("fp8_linear", "SUM_PIECES_IN_GEMM", False), ("router", "GROUPED_IN_KERNEL", False),
               ("mla_decode", "TMA", False), ("fp8", "PAD_FOR_SCALED_MM", False), ("moe", "TMA", True),
               ("launch", "PDL", False), ("absorb", "ABSORB_MAX_SEQS", 16), ("launch", "PREFETCH_WEIGHTS", False),
               ("moe", "QUANTIZE_INTER_MAX_TOKENS", 16), ("fp8_linear", "PLAIN_ROWS_IN_LAUNCH", False),
               ("mla_decode", "_PROJECT_BLOCK_V", 16), ("router", "QUANTIZE_X_IN_KERNEL", False),
               ("mla_decode", "PREFETCH_CACHE", False), ("mla_decode", "TILE_BUFFERS", 2),
               ("fp8_linear", "SWAP_AB_MAX_M", 16), ("router", "ROUTE_BLOCKS_MAX_TOKENS", 512)]


@pytest.mark.parametrize("settings_on", [False, True])
@pytest.mark.parametrize("changes", [dict(), dict(q_lora_rank=96, topk_method="group_limited_greedy", n_group=4,
                                                   topk_group=2, routed_scaling_factor=2.0)])
def test_gpu_greedy_equals_cpu_reference(changes, settings_on, tmp_path, monkeypatch):
    import importlib
    for module, name, value in SETTINGS_ON if settings_on else []:
        monkeypatch.setattr(importlib.import_module(f"deepseek_v2.kernels.{module}"), name, value)
    cpu_model = DeepseekV2ForCausalLM(model_args(**changes)).init_weights(seed=0)
    cpu_model.save_pretrained(tmp_path)
    gpu_model = DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device="cuda")
    tok = Tokenizer.from_pretrained(TOKENIZER)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (5, 70, 300, 33, 129)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = run(LLMEngine(cpu_model, tok, EngineConfig(block_size=16)), prompts, params)
    graphs = LLMEngine(gpu_model, tok, EngineConfig(block_size=16, max_num_seqs=8))
    assert graphs.runner.graphs, "CUDA graphs were not captured"
    assert run(graphs, prompts, params) == ref
    assert graphs.async_scheduling and graphs.stats()["steps_launched_ahead"] > 20
    del graphs
    eager = LLMEngine(gpu_model, tok, EngineConfig(block_size=16, enforce_eager=True, enable_prefix_caching=False,
                                                   max_num_batched_tokens=64))
    assert run(eager, prompts, params) == ref


@pytest.mark.parametrize("absorbed", [False, True])
@pytest.mark.parametrize("heads", [16, 128])  # V2-Lite's and V2's head counts
def test_mixed_steps_in_piecewise_graphs_equal_cpu_reference(heads, absorbed, tmp_path, monkeypatch):
    """Steps that hold prefills run as captured pieces around eager attention (engine/piecewise.py), or
    (absorbed) those whose prompt chunks are short beside their context as rows of the whole-step decode
    graph (ModelRunner.absorbs_prefill): with a small token budget every step mixes chunks of prompts
    with decodes, requests join midway and one prompt hits the prefix cache; greedy tokens equal the
    CPU reference engine's, fp32."""
    cpu_model = DeepseekV2ForCausalLM(model_args(num_attention_heads=heads)).init_weights(seed=7)
    cpu_model.save_pretrained(tmp_path)
    gpu_model = DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device="cuda")
    tok = Tokenizer.from_pretrained(TOKENIZER)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (5, 70, 300, 33, 129, 90)]
    prompts.append(prompts[4][:96] + [7, 8, 9])  # shares 96 tokens (six 16-token blocks) with prompt 4
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ref = run(LLMEngine(cpu_model, tok, EngineConfig(block_size=16)), prompts, params)
    engine = LLMEngine(gpu_model, tok, EngineConfig(block_size=16, max_num_seqs=8, max_num_batched_tokens=96,
                                                    num_kv_blocks=256))
    runner = engine.runner
    pieces = runner.piecewise
    assert pieces is not None and pieces.graphs, "piecewise graphs were not captured"
    sizes, replay = [], pieces.run
    pieces.run = lambda ids, *rest: sizes.append(len(ids)) or replay(ids, *rest)
    if not absorbed:
        runner.absorbed_prefill_max_rows = 0
    else:  # every step that fits the graphs and the bound on reads, whatever its prompt tokens
        from deepseek_v2.engine import model_runner
        monkeypatch.setattr(model_runner, "ABSORBED_PREFILL_MAX_TOKENS", 4096)
    chosen, absorbs = [], runner.absorbs_prefill
    runner.absorbs_prefill = lambda items: chosen.append(absorbs(items)) or chosen[-1]
    for i, p in enumerate(prompts[:3]):
        engine.add_request(str(i), p, params)
    joined, done = 3, {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        if joined < len(prompts):  # the others join one a step, while the first ones decode
            engine.add_request(str(joined), prompts[joined], params)
            joined += 1
    assert [done[str(i)] for i in range(len(prompts))] == ref
    if absorbed:
        assert chosen.count(True) >= 5
    else:
        assert len(sizes) >= 5 and any(t not in pieces.counts for t in sizes)


@pytest.mark.parametrize("budget", [None, 64])  # 64 tokens a step: prompts in chunks, launched ahead too
def test_steps_launched_ahead_equal_the_synchronous_engine_in_graphs(tmp_path, budget):
    """Asynchronous scheduling with CUDA graphs (the input tokens of a step launched ahead are copied on
    the device into the graph's buffer; two host staging buffers in turn): every request streams what
    the engine without it streams, greedy and seeded sampling with n = 2, sequences ending by a stop
    token and by max_tokens inside the chains, a request joining midway (admitted by a step launched
    ahead: its prompt through the piecewise graphs, the decode rows' tokens read on the device)."""
    model = DeepseekV2ForCausalLM(model_args()).to("cuda").init_weights(seed=3)
    tok = Tokenizer.from_pretrained(TOKENIZER)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (5, 70, 300, 33)]
    params = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
              SamplingParams(n=2, temperature=0.8, top_k=50, max_tokens=40, seed=11, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=48, stop_token_ids=list(range(2, 40)))]

    def serve(mode):
        knobs = {} if budget is None else dict(max_num_batched_tokens=budget)
        engine = LLMEngine(model, tok, EngineConfig(block_size=16, max_num_seqs=8, num_kv_blocks=256,
                                                    async_scheduling=mode, **knobs))
        assert engine.runner.graphs, "CUDA graphs were not captured"
        streams = {}
        for i in range(3):
            engine.add_request(str(i), prompts[i], params[i])
        step = 0
        while engine.has_unfinished_requests():
            if step == 6:
                engine.add_request("3", prompts[3], params[3])
            for o in engine.step():
                streams.setdefault(o.request_id, []).append([(c.index, list(c.delta_token_ids), c.finish_reason)
                                                             for c in o.outputs])
            step += 1
        stats = engine.stats()
        return streams, stats["steps_launched_ahead"], stats["steps_launched_ahead_with_prompts"]

    expected, _, _ = serve("off")
    got, ahead, with_prompts = serve("on")
    assert ahead > 20 and with_prompts >= 1 and got == expected


def test_a_step_launched_ahead_never_waits_for_the_device(tmp_path):
    """Launching the next step queues work and returns: nothing in it synchronises with the device
    (torch's sync debug mode raises on a blocking copy, an .item() or a stream wait), with greedy
    rows, rows sampled with temperature, top-k, top-p and min-p, a seeded row, sequences leaving the
    batch by length (the rows kept are picked on the device), and prompts admitted beside the decodes
    (through the piecewise graphs)."""
    model = DeepseekV2ForCausalLM(model_args()).to("cuda").init_weights(seed=3).to(torch.bfloat16)
    tok = Tokenizer.from_pretrained(TOKENIZER)
    engine = LLMEngine(model, tok, EngineConfig(block_size=16, max_num_seqs=8, num_kv_blocks=256,
                                                async_scheduling="on"))
    runner, launched = engine.runner, []
    launch = runner.launch_next

    def strict(*args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            launched.append(launch(*args))
            return launched[-1]
        finally:
            torch.cuda.set_sync_debug_mode("default")

    runner.launch_next = strict
    g = torch.Generator().manual_seed(5)
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)]
    for i, p in enumerate(params):
        engine.add_request(str(i), torch.randint(2, 512, (20 + 9 * i,), generator=g).tolist(), p)
    steps = 0
    while engine.has_unfinished_requests():
        if steps in (5, 9):  # they join a step launched ahead
            engine.add_request(f"late{steps}", torch.randint(2, 512, (40,), generator=g).tolist(), params[steps % 2])
        engine.step()
        steps += 1
    stats = engine.stats()
    assert len(launched) > 20 and stats["steps_launched_ahead"] == len(launched)
    assert stats["steps_launched_ahead_with_prompts"] >= 1


def test_bf16_decode_graph_equals_the_eager_step():
    """A bf16 decode step replayed from its captured graph gives the logits of the same step run eagerly:
    same kernels on the same inputs (the graph pads the batch and picks the split count for the longest
    context, so the fp32 sums may be ordered differently: a bf16-sized difference, no more). Compared on
    one step's logits: greedy tokens of a random bf16 model over many steps diverge at the first near-tie."""
    model = DeepseekV2ForCausalLM(model_args()).to("cuda").init_weights(seed=1).to(torch.bfloat16)
    tok = Tokenizer.from_pretrained(TOKENIZER)
    g = torch.Generator().manual_seed(2)
    engine = LLMEngine(model, tok, EngineConfig(block_size=64, max_num_seqs=4, num_kv_blocks=64))
    assert engine.runner.graphs, "CUDA graphs were not captured"
    for i, n in enumerate((7, 100, 250)):
        engine.add_request(str(i), torch.randint(2, 512, (n,), generator=g).tolist(),
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()  # the prefills
    step = engine.runner.prepare_inputs(engine.scheduler.schedule())
    assert step.forward.decode_only and len(step.items) == 3
    replayed = engine.runner.forward(step.forward).clone()
    graphs, engine.runner.graphs = engine.runner.graphs, {}
    eager = engine.runner.forward(step.forward)
    engine.runner.graphs = graphs
    assert ((replayed - eager).norm() / eager.norm()).item() < 1e-2
    assert torch.equal(replayed.argmax(-1), eager.argmax(-1))


def test_decode_graph_through_tma_equals_the_pointer_step(monkeypatch):
    """From mla_decode.TMA_MIN_SEQS sequences the decode graph reads the latent cache through TMA (bf16,
    64-token pages): its logits are those of the same step run eagerly with pointers, to a bf16-sized
    difference (the dots see the same tiles; the graph's split count may differ)."""
    from deepseek_v2.kernels import mla_decode
    n = mla_decode.TMA_MIN_SEQS + 8
    model = DeepseekV2ForCausalLM(model_args()).to("cuda").init_weights(seed=5).to(torch.bfloat16)
    tok = Tokenizer.from_pretrained(TOKENIZER)
    g = torch.Generator().manual_seed(6)
    engine = LLMEngine(model, tok, EngineConfig(block_size=64, max_num_seqs=n, num_kv_blocks=512,
                                                max_num_batched_tokens=16384))
    for i in range(n):  # 40 prompts of 1-299 tokens: one step prefills them all
        engine.add_request(str(i), torch.randint(2, 512, (int(torch.randint(1, 300, (1,), generator=g)),),
                                                 generator=g).tolist(),
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()  # the prefills
    step = engine.runner.prepare_inputs(engine.scheduler.schedule())
    assert step.forward.decode_only and len(step.items) == n
    replayed = engine.runner.forward(step.forward).clone()
    monkeypatch.setattr(mla_decode, "TMA", False)
    graphs, engine.runner.graphs = engine.runner.graphs, {}
    pointers = engine.runner.forward(step.forward)
    engine.runner.graphs = graphs
    assert ((replayed - pointers).norm() / pointers.norm()).item() < 1e-2
    assert (replayed.argmax(-1) == pointers.argmax(-1)).float().mean().item() >= 0.95


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_programmatic_dependent_launch_changes_no_bit(prefetch, fp8, monkeypatch):
    """Our kernels launched with programmatic dependent launch (launch.PDL, on for Hopper-class GPUs) wait
    for the kernel before them ahead of any load or store: a bf16 engine's greedy tokens and their
    log-probabilities, decode graphs and the steps that prefill beside decodes included, are bit for bit
    those of an engine captured with it off; also with FP8 weights, and with the weights asked of L2
    before the wait (launch.PREFETCH_WEIGHTS, moe.PREFETCH_SHARED) and the cache rows too
    (mla_decode.PREFETCH_CACHE)."""
    from deepseek_v2.kernels import launch, mla_decode, moe
    if not launch.hopper_class(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs a Hopper-class GPU")
    monkeypatch.setattr(launch, "PREFETCH_WEIGHTS", prefetch)
    monkeypatch.setattr(moe, "PREFETCH_SHARED", prefetch)
    monkeypatch.setattr(mla_decode, "PREFETCH_CACHE", prefetch)
    model = DeepseekV2ForCausalLM(model_args()).to("cuda").init_weights(seed=7).to(torch.bfloat16)
    if fp8:
        model.use_fp8()
    tok = Tokenizer.from_pretrained(TOKENIZER)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (7, 100, 250, 33, 64, 180)]

    def generate():
        engine = LLMEngine(model, tok, EngineConfig(block_size=64, max_num_seqs=8, num_kv_blocks=256,
                                                    max_num_batched_tokens=256))  # some prompts beside decodes
        assert engine.runner.graphs, "CUDA graphs were not captured"
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
        return run(engine, prompts, params, lambda completion: (completion.token_ids, completion.logprobs))

    with_pdl = generate()
    monkeypatch.setattr(launch, "PDL", False)
    without = generate()
    assert with_pdl == without


def test_triton_equals_reference_on_the_gpu(tmp_path):
    """The one switch flipped on the same device: the reference kernel set (PyTorch, eager) and the Triton
    set (with CUDA graphs) give the same greedy tokens in fp32."""
    DeepseekV2ForCausalLM(model_args(q_lora_rank=96)).init_weights(seed=3).save_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(TOKENIZER)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (9, 200, 64)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    out = {}
    for kernels, eager in (("reference", True), ("triton", False)):
        model = DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device="cuda")
        engine = LLMEngine(model, tok, EngineConfig(block_size=16, max_num_seqs=4, num_kv_blocks=256,
                                                    kernels=kernels, enforce_eager=eager))
        assert model.model.layers[1].mlp.experts.kernels.name == kernels
        out[kernels] = run(engine, prompts, params)
        del engine  # its cache and graphs go before the next engine is built
    assert out["triton"] == out["reference"]
    with pytest.raises(ValueError, match="enforce_eager"):
        LLMEngine(model, tok, EngineConfig(block_size=16, num_kv_blocks=256, kernels="reference"))


def test_a_plan_that_cannot_fit_is_refused_before_loading():
    """DeepSeek-V2 (236B) on one GPU: refused with the memory plan's figures, before any weight exists."""
    from deepseek_v2.config import PRESETS
    from deepseek_v2.engine.workers import ModelSource
    before = torch.cuda.memory_allocated()
    with pytest.raises(ValueError, match="does not fit") as info:
        LLMEngine.from_source(ModelSource(args=PRESETS["v2"]), Tokenizer.from_pretrained(TOKENIZER), EngineConfig(),
                              dtype="bfloat16", device="cuda")
    assert "weights 439.1 GiB" in str(info.value)
    assert torch.cuda.memory_allocated() == before


def test_world_size_one_through_the_distributed_path(tmp_path):
    """An NCCL group of one rank: every all-reduce and the logits' gather run, inside the captured decode
    graphs too; the greedy tokens equal the plain single-process engine's."""
    import socket
    import torch.distributed as dist
    from deepseek_v2.engine.workers import ModelSource, Workers, join_group
    DeepseekV2ForCausalLM(model_args(q_lora_rank=96)).init_weights(seed=5).save_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(TOKENIZER)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (9, 130, 40)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    config = EngineConfig(block_size=16, max_num_seqs=4, num_kv_blocks=256)
    source = ModelSource(path=str(tmp_path), dtype=torch.float32)
    plain = LLMEngine(source.build(SINGLE, torch.device("cuda")), tok, config)
    expected = run(plain, prompts, params)
    del plain
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tp, control = join_group(0, 1, f"tcp://127.0.0.1:{port}", "nccl")
    try:
        engine = LLMEngine(source.build(tp, torch.device("cuda")), tok, config, Workers(1), control)
        assert engine.runner.graphs and engine.model.tp.group is not None
        assert run(engine, prompts, params) == expected
        engine.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_ranks_sharing_the_gpu_over_gloo(tmp_path):
    """Tensor parallelism over 2 ranks on the one GPU (gloo through the host; NCCL refuses two ranks on one
    device): the Triton kernels at 8 of 16 heads and half the experts give the single-process tokens."""
    from deepseek_v2.engine.workers import ModelSource
    DeepseekV2ForCausalLM(model_args(topk_method="group_limited_greedy", n_group=4, topk_group=2)
                          ).init_weights(seed=7).save_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(TOKENIZER)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (5, 77, 200)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    out = {}
    for world in (1, 2):
        config = EngineConfig(block_size=16, max_num_seqs=4, num_kv_blocks=256, tensor_parallel_size=world)
        engine = LLMEngine.from_source(ModelSource(path=str(tmp_path)), tok, config, dtype="float32", device="cuda")
        assert engine.model.model.layers[0].self_attn.num_heads == 16 // world
        assert engine.model.model.layers[0].self_attn.kernels.name == "triton"
        out[world] = run(engine, prompts, params)
        processes = engine.workers.processes if engine.workers else []
        engine.close()
        assert not any(p.is_alive() for p in processes)
        del engine
    assert out[2] == out[1]



def long_prompt_engine_logprobs(path, prompt, dtype, budget):
    """Log-probabilities of every prompt token from the engine (eager), its prefill cut by the budget."""
    model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype, device="cuda")
    engine = LLMEngine(model, Tokenizer.from_pretrained(path), EngineConfig(
        max_model_len=32768, max_num_batched_tokens=budget, num_kv_blocks=1024, enforce_eager=True))
    engine.add_request("0", prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    out = None
    while engine.has_unfinished_requests():
        out = [o for o in engine.step() if o.finished] or out
    return torch.tensor([next(iter(e.values())) for e in out[0].prompt_logprobs[1:]])


def long_prompt_and_its_fp32_logprobs():
    """The needle harness's longest prompt (32,752 tokens of the haystack, shipped tokenizer) and the
    log-probability of each of its tokens from the shipped model's whole-sequence forward in fp32."""
    from pathlib import Path
    from deepseek_v2.config import DEFAULT_MODEL
    text = Path("deepseek_v2/eval/haystack.txt").read_text() * 2
    prompt = Tokenizer.from_pretrained(DEFAULT_MODEL).encode(text)[:32752]
    model = DeepseekV2ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device="cuda"))[0]
    return prompt, torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].cpu()


def test_a_32k_prompt_in_chunks_equals_the_whole_sequence_forward():
    """The shipped model (YaRN to 32K): a 32,752-token prompt (the needle harness's longest) prefilled in
    chunks of 4,096 (each later chunk reads the earlier ones from the paged cache) gives the
    log-probabilities of the whole-sequence forward at every position: fp32 (reference attention) to
    1e-3; in bf16 (flash attention) chunked and in one piece differ by less than bf16 differs from fp32."""
    from deepseek_v2.config import DEFAULT_MODEL
    assert ModelArgs.from_pretrained(DEFAULT_MODEL).max_position_embeddings == 32768
    prompt, whole = long_prompt_and_its_fp32_logprobs()
    assert len(prompt) == 32752
    chunked = long_prompt_engine_logprobs(DEFAULT_MODEL, prompt, torch.float32, 4096)
    diff = (chunked - whole).abs()
    print(f"fp32: mean |diff| {diff.mean():.2e}, max {diff.max():.2e}; mean logprob {whole.mean():.3f}")
    assert diff.mean() < 1e-3 and diff.max() < 5e-2
    bf16 = [long_prompt_engine_logprobs(DEFAULT_MODEL, prompt, torch.bfloat16, b) for b in (32768, 4096)]
    diff, rounding = (bf16[1] - bf16[0]).abs().mean(), (bf16[0] - whole).abs().mean()
    print(f"bf16 chunked vs one piece: mean |diff| {diff:.2e}; bf16 vs fp32 {rounding:.2e}")
    assert diff < rounding


def test_the_triton_prefill_kernel_on_a_32k_prompt(monkeypatch):
    """The shipped model's 32,752-token prompt in bf16, chunks of 4,096 after up to 28K cached tokens,
    with every prefill step's attention in our Triton kernel (kernels/prefill_triton.py) and then in
    flash: the Triton run's log-probabilities are as close to the fp32 whole-sequence forward as flash's
    (within 10%)."""
    from deepseek_v2.config import DEFAULT_MODEL
    from deepseek_v2.kernels import prefill
    prompt, whole = long_prompt_and_its_fp32_logprobs()
    flash = long_prompt_engine_logprobs(DEFAULT_MODEL, prompt, torch.bfloat16, 4096)
    monkeypatch.setattr(prefill, "TRITON_FROM_KEYS", 1)
    calls, kernel = [], prefill.prefill_triton.prefill_attention
    monkeypatch.setattr(prefill.prefill_triton, "prefill_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    triton_run = long_prompt_engine_logprobs(DEFAULT_MODEL, prompt, torch.bfloat16, 4096)
    flash_error, triton_error = (flash - whole).abs().mean(), (triton_run - whole).abs().mean()
    print(f"bf16 vs fp32, mean |diff|: flash {flash_error:.2e}, Triton kernel {triton_error:.2e}")
    assert len(calls) >= 8 * 6 and triton_error < 1.1 * flash_error  # 8 chunks x 6 layers at least
