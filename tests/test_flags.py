# Run: python -m pytest -q tests/test_flags.py
"""The flags every command shares (deepseek_v2/flags.py): each EngineConfig field is a flag on every
command that loads a model, no flags give EngineConfig's defaults (bench: its documented overrides),
each flag sets its field, and a bad value is an argparse error."""

import re
from dataclasses import fields, replace

import pytest

from deepseek_v2 import bench
from deepseek_v2.cli import build_parser
from deepseek_v2.config import EngineConfig
from deepseek_v2.flags import SERVER_ONLY, engine_kwargs, flag_name

COMMANDS = {"demo": [], "generate": ["a prompt"], "chat": [], "serve": [], "bench": []}  # required arguments

# One non-default setting per field: the words on the command line and the value they give the field.
GIVEN = {
    "max_model_len": (["--max-model-len", "8192"], 8192),
    "max_num_seqs": (["--max-num-seqs", "512"], 512),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "2048"], 2048),
    "long_prefill_token_threshold": (["--long-prefill-token-threshold", "512"], 512),
    "max_prefill_tokens_beside_decodes": (["--max-prefill-tokens-beside-decodes", "512"], 512),
    "block_size": (["--block-size", "16"], 16),
    "enable_prefix_caching": (["--no-enable-prefix-caching"], False),
    "enforce_eager": (["--enforce-eager"], True),
    "gpu_memory_utilization": (["--gpu-memory-utilization", "0.5"], 0.5),
    "cpu_kv_cache_gib": (["--cpu-kv-cache-gib", "0.5"], 0.5),
    "num_kv_blocks": (["--num-kv-blocks", "100"], 100),
    "max_waiting_requests": (["--max-waiting-requests", "3"], 3),
    "seed": (["--seed", "7"], 7),
    "kernels": (["--kernels", "reference"], "reference"),
    "tensor_parallel_size": (["-tp", "2"], 2),
    "quantization": (["--quantization", "fp8"], "fp8"),
    "kv_cache_dtype": (["--kv-cache-dtype", "fp8"], "fp8"),
    "async_scheduling": (["--async-scheduling", "off"], "off"),
}


def parse(command: str, *flags: str):
    return build_parser(command).parse_args([command, *COMMANDS[command], *flags])


def config(command: str, *flags: str) -> EngineConfig:
    args = parse(command, *flags)
    return bench.engine_config(args) if command == "bench" else EngineConfig(**engine_kwargs(args))


def takes(command: str, field: str) -> bool:
    return command == "serve" or field not in SERVER_ONLY


def test_every_field_has_a_setting_here():
    assert set(GIVEN) == {f.name for f in fields(EngineConfig)}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_a_flag_under_the_engine_heading(command, capsys):
    with pytest.raises(SystemExit):
        parse(command, "--help")
    help_text = capsys.readouterr().out
    section = help_text.split("\nengine:\n")[1].split("\n\n")[0]
    expected = set()
    for f in fields(EngineConfig):
        if takes(command, f.name):
            expected.add(flag_name(f.name))
            if f.type == "bool":
                expected.add(flag_name("no_" + f.name))
    assert set(re.findall(r"--[a-z-]+", section)) == expected


@pytest.mark.parametrize("command", ["demo", "generate", "chat", "serve"])
def test_no_flags_give_the_dataclass_defaults(command):
    assert config(command) == EngineConfig()
    args = parse(command)
    assert (args.model, args.dtype, args.device) == (None, "auto", None)


def test_bench_defaults_are_its_documented_overrides():
    # docs/benchmarks.md's settings; the workload's longest sequence (4096-token prefill + 8) and
    # largest concurrency (256).
    assert config("bench") == EngineConfig(max_model_len=4104, max_num_seqs=256, max_num_batched_tokens=16384,
                                           gpu_memory_utilization=0.85)
    assert parse("bench").dtype == "bfloat16"
    small = config("bench", "--prompt-len", "16", "--output-len", "4", "--decode-len", "4", "--prefill-len", "32",
                   "--batch-sizes", "1,2", "--prefill-prompts", "1")
    assert (small.max_model_len, small.max_num_seqs) == (64 + 8, 2)  # the warm-up prompts are the longest


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("field", GIVEN)
def test_each_flag_sets_its_field(command, field):
    words, value = GIVEN[field]
    if not takes(command, field):
        with pytest.raises(SystemExit):
            parse(command, *words)
        return
    assert config(command, *words) == replace(config(command), **{field: value})


def test_cpu_cache_flag_is_in_gib():
    assert config("generate", "--cpu-kv-cache-gib", "0.5").cpu_kv_cache_bytes == 2**29
    assert EngineConfig().cpu_kv_cache_bytes == 2**30


@pytest.mark.parametrize("command", COMMANDS)
def test_model_flags(command):
    args = parse(command, "--model", "/ckpt", "--dtype", "float16", "--device", "cpu")
    assert (args.model, args.dtype, args.device) == ("/ckpt", "float16", "cpu")


@pytest.mark.parametrize("command, words, message", [
    ("generate", ["--block-size", "abc"], "argument --block-size: invalid int value: 'abc'"),
    ("serve", ["--gpu-memory-utilization", "most"], "argument --gpu-memory-utilization: invalid float value: 'most'"),
    ("bench", ["--max-num-seqs", "1.5"], "argument --max-num-seqs: invalid int value: '1.5'"),
    ("chat", ["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    ("demo", ["--max-waiting-requests", "3"], "unrecognized arguments: --max-waiting-requests 3"),
    ("serve", ["--kernels", "cuda"], "argument --kernels: invalid choice: 'cuda'"),
])
def test_a_bad_value_is_one_argparse_error_line(command, words, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(command, *words)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()  # the usage, then one error line
    assert [line for line in lines if "error:" in line] == [lines[-1]] and message in lines[-1]


def test_bench_uses_a_larger_given_size_and_refuses_a_smaller_one():
    got = config("bench", "--max-model-len", "8192", "--max-num-seqs", "300")
    assert (got.max_model_len, got.max_num_seqs) == (8192, 300)
    with pytest.raises(ValueError, match="--max-num-seqs 8 is below the 256 this workload needs"):
        config("bench", "--max-num-seqs", "8")
    with pytest.raises(ValueError, match="--max-model-len 1024 is below the 4104 this workload needs"):
        config("bench", "--max-model-len", "1024")


def test_a_negative_prefill_chunk_limit_is_refused():
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be >= 0, got -1"):
        EngineConfig(long_prefill_token_threshold=-1)
