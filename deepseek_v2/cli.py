"""The `deepseek-v2` command: demo, generate, chat, info, quantize, serve, bench, bench-serve, train, sft, eval.

Only this module parses arguments. Errors a user can cause (no such directory, not a DeepSeek-V2
checkpoint, a corrupt file, a bad value) print one line and exit with status 1."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .flags import (add_engine_arguments, add_model_argument, add_model_arguments, check_device, check_model,
                    engine_kwargs)
from .parallel import launch_env
from .plan import DTYPE_BYTES, cache_bytes_per_token

EXPECTED_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError, OSError)


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of this generation")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token, up to --max-tokens")


def sampling_params(args: argparse.Namespace):
    from .sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                          seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos)


def engine_source(args: argparse.Namespace):
    """(where the model comes from, EngineConfig, dtype, device) of a command that loads a checkpoint."""
    from .config import DEFAULT_MODEL, EngineConfig
    from .engine.workers import ModelSource
    return ModelSource(path=args.model or DEFAULT_MODEL), EngineConfig(**engine_kwargs(args)), args.dtype, args.device


def load_engine(args: argparse.Namespace):
    """The engine of a command's flags; every flag and the checkpoint's files are checked first, so
    a mistake is reported before the seconds of loading."""
    from .engine.llm_engine import LLMEngine
    from .tokenizer import Tokenizer
    source, config, dtype, device = engine_source(args)
    check_device(device)
    check_model(source.path)  # a missing, foreign or truncated directory is named before its tokenizer is read
    return LLMEngine.from_source(source, Tokenizer.from_pretrained(source.path), config, dtype, device)


def stream(engine, prompt, params, out=sys.stdout, lstrip: bool = False) -> str:
    """Run one request, printing text as it comes (lstrip: without the leading whitespace, as after
    a chat template's "Assistant:"); returns the whole text. Ctrl-C stops the request and raises."""
    rid = f"cli-{id(prompt)}-{len(engine.requests)}"
    text = ""
    try:
        engine.add_request(rid, prompt, params)  # inside: a Ctrl-C just after it still aborts the request
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.request_id == rid:
                    delta = o.outputs[0].delta_text
                    if lstrip and not text.strip():
                        delta = delta.lstrip()
                    out.write(delta)
                    out.flush()
                    text = o.outputs[0].text
    except KeyboardInterrupt:
        engine.abort(rid)
        out.write("\n")
        raise
    out.write("\n")
    return text.lstrip() if lstrip else text


# ---- commands ---------------------------------------------------------------------------------------
def cmd_generate(args) -> None:
    params = sampling_params(args)  # a bad value is an error now, not after loading
    if args.chat and args.suffix is not None:
        raise ValueError("--chat and --suffix cannot be used together: a fill-in-the-middle prompt is not a chat")
    engine = load_engine(args)
    prompt = args.prompt
    if args.suffix is not None:
        prompt = engine.tokenizer.fill_in_middle(prompt, args.suffix)
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True)
    stream(engine, prompt, params, lstrip=args.chat)


def cmd_chat(args) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    params = sampling_params(args)
    engine = load_engine(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model. Ctrl-C stops a reply (at the prompt it quits, as do /exit and Ctrl-D); "
          "/reset clears the conversation.", file=sys.stderr)
    while True:
        try:
            line = input("You: ")
        except (EOFError, KeyboardInterrupt):  # at the prompt, Ctrl-C quits (during a reply it stops the reply)
            print()
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = engine.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        sys.stdout.write("Assistant: ")
        try:
            reply = stream(engine, ids, params, lstrip=True)
        except KeyboardInterrupt:  # the reply stops; the conversation goes on with what was said
            print("(stopped)", file=sys.stderr)
            reply = ""
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply.strip()})


def cmd_info(args) -> None:
    from .config import DEFAULT_MODEL, PRESETS
    if args.shape:
        if args.shape not in PRESETS:
            raise ValueError(f"unknown shape {args.shape!r} (known: {', '.join(PRESETS)})")
        a, source = PRESETS[args.shape], f"built-in shape {args.shape}"
    else:
        source = args.model or DEFAULT_MODEL
        a = check_model(source)  # missing or truncated weights are an error, not a report
    plan_lines = memory_plan_lines(a, args)  # before any output: a bad size is one line of error, not half a report
    counts = a.num_parameters()
    latent = cache_bytes_per_token(a, DTYPE_BYTES[args.cache_dtype])
    full = a.mha_cache_dim * a.num_hidden_layers * max(DTYPE_BYTES[args.cache_dtype], 2)
    layout = "".join("M" if a.is_moe_layer(i) else "D" for i in range(a.num_hidden_layers))
    print(f"model: {source}")
    print(f"parameters: {counts['total']:,} total, {counts['activated']:,} activated per token "
          f"(incl. LM head, excl. input embedding)")
    print(f"layers: {a.num_hidden_layers} ({layout.count('D')} dense, {layout.count('M')} MoE): {layout}")
    print(f"attention: MLA, {a.num_attention_heads} heads, q_lora_rank {a.q_lora_rank}, kv_lora_rank "
          f"{a.kv_lora_rank}, qk_nope {a.qk_nope_head_dim} + qk_rope {a.qk_rope_head_dim}, v {a.v_head_dim}")
    if a.n_routed_experts:
        print(f"MoE: {a.n_routed_experts} routed experts (top-{a.num_experts_per_tok}, {a.topk_method}"
              + (f", {a.topk_group} of {a.n_group} groups" if a.topk_method == "group_limited_greedy" else "")
              + f") + {a.n_shared_experts or 0} shared, expert width {a.moe_intermediate_size}, "
              f"routed_scaling_factor {a.routed_scaling_factor}")
    rs = a.rope_scaling
    print("rope: " + (f"yarn x{rs.factor:g} from {rs.original_max_position_embeddings} tokens, "
                      f"max {a.max_position_embeddings}" if rs else f"plain, max {a.max_position_embeddings}"))
    print(f"latent cache ({args.cache_dtype}): {a.kv_cache_dim} values/token/layer"
          + (" in e4m3 + a 4-byte scale" if args.cache_dtype == "fp8" else "") + f" = {latent:,} bytes/token; "
          f"the full per-head K/V cache of the official code: {a.mha_cache_dim:,} values/token/layer = "
          f"{full:,} bytes/token ({full / latent:.1f}x more, MLA saves {100 * (1 - latent / full):.1f}%)")
    print("\n".join(plan_lines))


# The engine knobs that change a memory plan; `info` takes these and no others.
PLAN_KNOBS = {"max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "gpu_memory_utilization",
              "enforce_eager"}


def memory_plan_lines(a, args) -> list[str]:
    """`info`'s memory plans: for --gpu-memory-gib, or for an H100 and an H200 when it is not given."""
    from .config import EngineConfig
    from .plan import KNOWN_GPUS, GiB, format_plan, longest_fitting_len, memory_plan
    config, tp = EngineConfig(**engine_kwargs(args)), args.tensor_parallel_size
    sizes = (config, DTYPE_BYTES[args.dtype], DTYPE_BYTES[args.cache_dtype])
    gpus = KNOWN_GPUS if args.gpu_memory_gib is None else {None: int(args.gpu_memory_gib * GiB)}
    sized = {(c.max_num_batched_tokens, c.max_num_seqs) for c in (config.sized_for(m) for m in gpus.values())}
    batch = (f"max_num_batched_tokens {next(iter(sized))[0]:,}, max_num_seqs {next(iter(sized))[1]:,}"
             if len(sized) == 1 else "max_num_batched_tokens and max_num_seqs by GPU memory (--help)")
    lines = [f"memory plan: {args.dtype} weights, {args.cache_dtype} cache, {batch}"]
    if tp > 1:
        lines.append(f"the latent cache is replicated on every rank: each of the {tp} GPUs holds every "
                     "cached token's latent (the bytes/token above)")
    for name, memory in gpus.items():
        plan = memory_plan(a, tp, memory, *sizes)
        if name is not None:
            lines.append(f"{name} ({memory / GiB:.1f} GiB):")
        lines.append(format_plan(plan))
        if not plan.fits:
            n = longest_fitting_len(a, tp, memory, *sizes)
            lines.append(f"  fits with --max-model-len up to {n:,}" if n else "  no max_model_len fits")
    return lines


def cmd_quantize(args) -> None:
    """A checkpoint in DeepSeek's FP8 layout (docs/fp8.md), written tensor by tensor (the memory of a
    shard, not of the model), with the tokenizer files beside it."""
    import shutil
    from pathlib import Path
    from .checkpoint import weight_files
    from .model import DeepseekV2ForCausalLM
    source, target = Path(args.input), Path(args.output)
    if target.exists() and target.resolve() == source.resolve():
        raise ValueError("quantize: OUT must be another directory than IN")
    size = sum(f.stat().st_size for f in weight_files(source))
    DeepseekV2ForCausalLM.quantize_pretrained(source, target, max_shard_size=int(args.max_shard_gib * 2**30))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    written = sum(f.stat().st_size for f in weight_files(target))
    print(f"wrote {target}: FP8 weights with 128x128 block scales, {written / 2**30:.2f} GiB "
          f"(from {size / 2**30:.2f} GiB)")


def cmd_demo(args) -> None:
    from .sampling_params import SamplingParams
    engine = load_engine(args)
    question = "What does the Python function len do?"
    print(f"User: {question}\nAssistant:", end="", flush=True)
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    print(" ", end="")
    stream(engine, ids, SamplingParams(temperature=0, max_tokens=96), lstrip=True)
    prompt = "The dictionary is a data structure that"
    print(f"\nCompletion of {prompt!r}:\n{prompt}", end="", flush=True)
    stream(engine, prompt, SamplingParams(temperature=0, max_tokens=64))
    command = command_name()
    print(f"\nNext:\n  {command} chat     chat in the terminal\n"
          f"  {command} serve    an OpenAI-compatible server; chat page at http://127.0.0.1:8000/")


def command_name() -> str:
    """How to run this command from here: its name when it is on PATH, else its path (a virtual
    environment that is not activated), relative to the working directory when shorter."""
    import os
    import shutil
    script = os.path.join(os.path.dirname(sys.executable), "deepseek-v2")
    found = shutil.which("deepseek-v2")
    if found and os.path.realpath(found) == os.path.realpath(script) or not os.path.exists(script):
        return "deepseek-v2"
    relative = os.path.relpath(script)
    return relative if len(relative) < len(script) else script


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="deepseek-v2", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    parser.add_argument("--version", action="version", version=f"deepseek-v2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="a chat reply and a completion from the default model")
    add_model_arguments(p)
    add_engine_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="complete a prompt, streaming the text")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--suffix", help="fill in the middle: generate the text between the prompt and this (the "
                                    "fill-in-the-middle prompt of DeepSeek-Coder-V2)")
    add_model_arguments(p)
    add_sampling_arguments(p)
    add_engine_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal (/reset, /exit)")
    p.add_argument("--system", default=None, help="system message")
    add_model_arguments(p)
    add_sampling_arguments(p, max_tokens=256)
    add_engine_arguments(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="parameters, layer layout, cache size and memory plans of a checkpoint or "
                                    "shape")
    add_model_argument(p)
    p.add_argument("--shape", default=None, help="a built-in shape instead: v2 or v2-lite")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_BYTES), help="the weights' dtype; fp8: "
                   "DeepSeek's FP8 layout, --quantization fp8 (default: %(default)s)")
    p.add_argument("--cache-dtype", default="bfloat16", choices=list(DTYPE_BYTES), help="the latent cache's dtype; "
                   "fp8: --kv-cache-dtype fp8 (default: %(default)s)")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, help="GPUs the model is split over "
                   "(default: %(default)s)")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="memory of one GPU (default: a plan for an H100 80 GB and one for an H200 141 GB)")
    add_engine_arguments(p, only=PLAN_KNOBS)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("quantize", help="write a checkpoint's weights in DeepSeek's FP8 layout (docs/fp8.md)")
    p.add_argument("input", metavar="IN", help="checkpoint directory (bf16, or already FP8)")
    p.add_argument("output", metavar="OUT", help="directory to write")
    p.add_argument("--max-shard-gib", type=float, default=5.0, help="largest safetensors file (default: %(default)s)")
    p.set_defaults(func=cmd_quantize)

    for name, module, adder, runner, help_text in LAZY_COMMANDS:
        p = sub.add_parser(name, help=help_text)
        if name == selected:  # import only the chosen command's module (optional extras)
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                extra = {"train": "train", "sft": "train", "eval": "eval"}.get(name, "server")
                raise SystemExit(f"deepseek-v2 {name}: error: {e.name or 'a dependency'} is not installed; "
                                 f"install the {extra} extra: pip install 'deepseek-v2[{extra}]'")
            getattr(mod, adder)(p)
            p.set_defaults(func=getattr(mod, runner))
    return parser


# Subcommands whose arguments live with their code (they need optional extras).
LAZY_COMMANDS = [
    ("serve", "deepseek_v2.server.cli", "add_arguments", "run", "OpenAI-compatible HTTP server with a chat page"),
    ("bench", "deepseek_v2.bench", "add_arguments", "run", "benchmark decode, throughput and prefill"),
    ("bench-serve", "deepseek_v2.bench_serve", "add_arguments", "run",
     "benchmark a running server: requests at a rate, TTFT / ITL / E2E latency percentiles"),
    ("train", "deepseek_v2.train.cli", "add_train_arguments", "run_train", "pretrain a model"),
    ("sft", "deepseek_v2.train.cli", "add_sft_arguments", "run_sft", "supervised fine-tuning on chat data"),
    ("eval", "deepseek_v2.eval.cli", "add_arguments", "run",
     "long-context evaluation: needle in a haystack (niah), sliding-window perplexity (ppl)"),
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(selected).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if hasattr(args, "tensor_parallel_size") and launch_env().rank > 0:
            # torchrun started this process as a tensor-parallel rank of the command rank 0 runs
            from .engine.workers import run_launched_worker
            run_launched_worker(*getattr(args, "engine_source", engine_source)(args))
        else:
            args.func(args)
    except EXPECTED_ERRORS as e:
        print(f"deepseek-v2 {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
