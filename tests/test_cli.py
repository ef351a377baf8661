# Run: python -m pytest -q tests/test_cli.py
"""The `deepseek-v2` command end to end on the shipped default model."""

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "deepseek_v2.cli"]


def run(*args, input_text=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, input=input_text, timeout=300)


def test_generate_streams_the_greedy_completion():
    from deepseek_v2 import LLM, SamplingParams
    r = run("generate", "def main():", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    expected = LLM(device="cpu").generate("def main():", SamplingParams(temperature=0, max_tokens=12))
    assert r.stdout == expected[0].outputs[0].text + "\n"


def test_chat_keeps_history_and_resets():
    r = run("chat", "--max-tokens", "8", input_text="hello\nhow are you?\n/reset\nagain\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Assistant: ") == 3
    assert "conversation cleared" in r.stderr


def test_info_reports_parameters_and_cache():
    r = run("info", "--shape", "v2-lite")
    assert r.returncode == 0, r.stderr
    assert "15,706,484,224 total" in r.stdout and "2,451,435,008 activated" in r.stdout
    assert "576 values/token/layer = 31,104 bytes/token" in r.stdout
    assert "5,120 values/token/layer = 276,480 bytes/token" in r.stdout
    r = run("info")
    assert r.returncode == 0 and "DMM" in r.stdout


def test_demo_runs():
    r = run("demo")
    assert r.returncode == 0, r.stderr
    assert "User: What does the Python function len do?" in r.stdout and "deepseek-v2 serve" in r.stdout


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no such checkpoint directory"),
    (lambda p: p.mkdir(), "no config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text(json.dumps({"model_type": "llama"}))), "model_type"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{")), "not valid JSON"),
])
def test_errors_are_one_clear_line(tmp_path, setup, message):
    path = tmp_path / "ckpt"
    setup(path)
    r = run("generate", "hi", "--model", str(path))
    assert r.returncode == 1
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_corrupt_weights_error(tmp_path):
    import shutil
    src = "deepseek_v2/default_model"
    shutil.copytree(src, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 100)
    r = run("generate", "hi", "--model", str(tmp_path / "m"))
    assert r.returncode == 1 and "corrupt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("tp", [1, 2])
def test_bench_runs_on_cpu_and_reports_every_figure(tmp_path, tp):
    """The benchmark's plumbing (no timing is asserted): random weights of a config's shape, tiny sizes,
    on one process and over two tensor-parallel ranks."""
    out = tmp_path / "bench.json"
    r = run("bench", "--config", "deepseek_v2/default_model/config.json", "--dtype", "float32",
            "--batch-sizes", "1,2", "--prompt-len", "16", "--output-len", "4", "--decode-len", "4",
            "--prefill-len", "32", "--prefill-prompts", "1", "--json", str(out), "-tp", str(tp))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["tensor_parallel_size"] == tp
    ours = result["ours"]
    assert set(ours) == {"decode_b1", "throughput_b1", "throughput_b2", "prefill", "ttft"}
    assert ours["decode_b1"]["tokens_per_s"] > 0 and ours["prefill"]["tokens_per_s"] > 0
    assert "random weights" in result["source"] and "| batch-1 decode" in r.stdout
