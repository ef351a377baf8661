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


def test_generate_fills_in_the_middle():
    from deepseek_v2 import LLM, SamplingParams
    r = run("generate", "def add(a, b):\n", "--suffix", "\n    return c\n", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    llm = LLM(device="cpu")
    prompt = llm.tokenizer.fill_in_middle("def add(a, b):\n", "\n    return c\n")
    assert r.stdout == llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text + "\n"
    r = run("generate", "x", "--suffix", "y", "--chat")
    assert r.returncode != 0 and "--suffix" in r.stderr and "Traceback" not in r.stderr


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
    assert "Assistant:  " not in r.stdout  # one space after the label, not the template's two
    hint = r.stdout.split("\nNext:\n", 1)[1].splitlines()  # short lines, whatever the command's path here
    assert len(hint) == 2 and all(line.startswith("  ") and len(line.split()[0]) + 80 > len(line) for line in hint)


def test_demo_hint_names_the_command_as_it_can_be_typed(monkeypatch, tmp_path):
    import os
    from deepseek_v2.cli import command_name
    script = os.path.join(os.path.dirname(sys.executable), "deepseek-v2")
    if not os.path.exists(script):
        pytest.skip("the package is not installed as a command in this environment")
    monkeypatch.setenv("PATH", os.path.dirname(script) + os.pathsep + "/usr/bin")
    assert command_name() == "deepseek-v2"  # an activated environment: the plain name
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.chdir(tmp_path)
    named = command_name()  # not on PATH: a path that runs it from here, whatever the environment's name
    assert os.path.samefile(named, script) and len(named) <= len(script)


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


def test_model_errors_read_the_same_in_every_command_and_a_truncated_checkpoint_fails(tmp_path):
    import shutil
    shutil.copytree("deepseek_v2/default_model", tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1_000_000])  # a download cut short
    for path, message in [(tmp_path / "none", "no such checkpoint directory"), (tmp_path / "m", "truncated")]:
        errors = set()
        for command in (["generate", "hi"], ["info"], ["serve", "--port", "1"]):
            r = run(*command, "--model", str(path))
            assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (command, r.stderr)
            errors.add(r.stderr.split("error: ", 1)[1])
        assert len(errors) == 1  # the same words from generate, info and serve


def test_a_checkpoint_without_weights_is_refused_unless_its_weights_are_random(tmp_path):
    import shutil
    from deepseek_v2.flags import check_model
    shutil.copytree("deepseek_v2/default_model", tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    assert check_model(str(tmp_path / "m"), weights=False).vocab_size > 0  # serve --load-format dummy
    r = run("serve", "--model", str(tmp_path / "m"), "--port", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_flags_are_checked_before_the_model_loads(tmp_path):
    import shutil
    shutil.copytree("deepseek_v2/default_model", tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 100)  # loading it would fail
    for flags, message in [(["--temperature", "-1"], "temperature"),
                           (["--max-num-seqs", "0"], "max_num_seqs")]:
        r = run("generate", "hi", "--model", str(tmp_path / "m"), *flags)
        assert r.returncode == 1 and message in r.stderr and "corrupt" not in r.stderr, r.stderr
    r = run("generate", "hi", "--device", "cuda")
    import torch
    if not torch.cuda.is_available():
        assert r.returncode == 1 and "--device cuda" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_version_and_serve_on_a_busy_port():
    import socket
    from deepseek_v2 import __version__
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"deepseek-v2 {__version__}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run("serve", "--port", str(s.getsockname()[1]))
    assert r.returncode == 1 and "Address already in use" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_chat_ctrl_c_stops_the_reply_and_the_conversation_goes_on():
    import os
    import signal
    # --ignore-eos: every reply runs to its 3,000 tokens unless stopped, so each Ctrl-C lands in a reply
    proc = subprocess.Popen([*CLI, "chat", "--max-tokens", "3000", "--ignore-eos"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = ""
    for turn, line in enumerate(["Write forever\n", "hello\n"], 1):
        proc.stdin.write(line)
        proc.stdin.flush()
        while seen.count("Assistant: ") < turn or len(seen.rsplit("Assistant: ", 1)[1]) < 10:  # the reply runs
            char = proc.stdout.read(1)
            assert char, seen + proc.stderr.read()
            seen += char
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("/exit\n", timeout=120)
    assert proc.returncode == 0, err
    assert err.count("(stopped)") == 2, err  # both replies stopped, the chat went on after the first
    assert "Assistant:  " not in seen  # one space after the label, not the template's two


def test_serve_without_the_server_extra_says_what_to_install():
    code = ("import sys; sys.modules['fastapi'] = sys.modules['uvicorn'] = None; "  # as if not installed
            "from deepseek_v2.cli import main; sys.exit(main(['serve']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == ("deepseek-v2 serve: error: uvicorn is not installed; install the server extra: "
                                "pip install 'deepseek-v2[server]'")


def test_chat_keeps_history_resets_and_edits_lines_in_a_terminal():
    """Through a pseudo-terminal, as a person types: the up arrow brings the last line back and it can
    be edited; /reset clears the conversation; /exit quits."""
    import os
    import pty
    import select
    master, slave = pty.openpty()
    proc = subprocess.Popen([*CLI, "chat", "--max-tokens", "3"], stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            env=dict(os.environ, TERM="dumb"), start_new_session=True)
    os.close(slave)
    screen = ""

    def type_after_prompt(count: int, keys: bytes) -> None:  # once the screen shows `count` prompts
        nonlocal screen
        while screen.count("You: ") < count:
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, screen
            screen += os.read(master, 4096).decode(errors="replace")
        os.write(master, keys)

    try:
        type_after_prompt(1, b"hello there\r")
        type_after_prompt(2, b"\x1b[A" + b"\x7f" * 5 + b"world\r")  # up arrow, five backspaces, a new ending
        type_after_prompt(3, b"/reset\r")
        type_after_prompt(4, b"again\r")
        type_after_prompt(5, b"/exit\r")
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    lines = [terminal_line(line) for line in screen.split("\n")]
    typed = [line.removeprefix("You: ") for line in lines if line.startswith("You: ")]
    assert typed[:4] == ["hello there", "hello world", "/reset", "again"], lines
    assert sum(line.startswith("Assistant: ") for line in lines) == 3
    assert "conversation cleared" in proc.stderr.read().decode()


def terminal_line(text: str) -> str:
    """What a terminal shows of a line written with backspaces and carriage returns."""
    shown, at = [], 0
    for ch in text:
        if ch == "\b":
            at = max(0, at - 1)
        elif ch == "\r":
            at = 0
        else:
            shown[at:at + 1] = [ch]
            at += 1
    return "".join(shown).rstrip()


def test_with_settings_runs_a_command_with_kernel_settings_changed(tmp_path):
    """scripts/with_settings.py (GPU benchmarks of paths not yet on by default): it sets what it is told (a
    kernel module's setting, or any deepseek_v2 module's or class's), refuses a setting the module does not
    have, then runs the command, or a script with its arguments."""
    script = [sys.executable, "scripts/with_settings.py"]
    r = subprocess.run([*script, "moe.COMBINE_IN_GEMM_MAX_TOKENS=64", "prefill.TRITON_FROM_KEYS=None",
                        "deepseek_v2.moe.MoE.FUSED_SHARED_MAX_TOKENS=256", "--", "info", "--shape", "v2-lite"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "moe.COMBINE_IN_GEMM_MAX_TOKENS = 64" in r.stderr and "15,706,484,224 total" in r.stdout
    assert "deepseek_v2.moe.MoE.FUSED_SHARED_MAX_TOKENS = 256" in r.stderr
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nfrom deepseek_v2.kernels import fp8\nprint(fp8.QUANTIZE_ONCE_FROM, sys.argv[1:])\n")
    r = subprocess.run([*script, "fp8.QUANTIZE_ONCE_FROM=17", "--", str(probe), "--batch=256"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "17 ['--batch=256']", r.stderr
    r = subprocess.run([*script, "moe.NO_SUCH_SETTING=1", "--", "info"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "has no setting NO_SUCH_SETTING" in r.stderr


def test_time_without_launches_stand_ins_keep_the_kernels_shapes():
    """scripts/time_without_launches.py (what a family of launches costs in a GPU step): each stand-in
    returns what the kernel it replaces returns, in shape and dtype (the reference kernels' outputs on
    small inputs), so the step runs on without it; the GEMMs' stand-in gives zeros, the router's valid
    picks; an unknown name is refused with the known ones."""
    sys.path.insert(0, "scripts")
    try:
        import time_without_launches as stand
    finally:
        sys.path.remove("scripts")
    import torch

    from deepseek_v2.kernels import reference
    from deepseek_v2.kernels.fp8 import quantize_weight

    def same(got, want):
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        assert [(g.shape, g.dtype) for g in got] == [(w.shape, w.dtype) for w in want]

    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16
    x, w = torch.randn(3, 256, generator=g, dtype=bf16), torch.randn(256, dtype=bf16)
    same(stand.no_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    same(stand.no_norm(x, w, 1e-6, x), reference.rms_norm(x, w, 1e-6, x))
    q_pe, kv = torch.randn(3, 4, 16, generator=g, dtype=bf16), torch.randn(3, 64 + 16, generator=g, dtype=bf16)
    cos, sin = torch.ones(3, 8), torch.zeros(3, 8)
    want = reference.mla_prepare(q_pe.clone(), kv, cos, sin, torch.ones(64, dtype=bf16), 1e-6)
    same(stand.no_prepare(q_pe, kv, cos, sin, torch.ones(64, dtype=bf16), 1e-6), want)
    q_nope, w_kv_b = torch.randn(3, 4, 32, generator=g, dtype=bf16), torch.randn(4, 32 + 24, 64, generator=g, dtype=bf16)
    same(stand.no_absorb(q_nope, w_kv_b[:, :32]), reference.absorb_query(q_nope, w_kv_b[:, :32]))
    q_lat = reference.absorb_query(q_nope, w_kv_b[:, :32])
    cache, tables, lens = torch.randn(4, 16, 80, generator=g, dtype=bf16), torch.arange(3)[:, None].int(), torch.full((3,), 5).int()
    for w_uv in (None, w_kv_b[:, 32:]):
        same(stand.no_attention(q_lat, q_pe, cache, tables, lens, 0.1, w_uv=w_uv),
             reference.mla_decode(q_lat, q_pe, cache, tables, lens, 0.1, w_uv=w_uv))
    router_w = torch.randn(8, 256, generator=g)
    logits, weights, ids = stand.no_router(x, router_w, 2, True, num_shared=2)
    same((logits, weights, ids), reference.route(x, router_w, 2, True, num_shared=2))
    assert ids.tolist() == [[0, 1, 8, 9]] * 3  # routed experts 0 and 1, the shared ones after the 8 routed
    same(stand.no_experts(x), x)
    q, s = quantize_weight(torch.randn(200, 256, generator=g))
    plain = torch.randn(24, 256, generator=g, dtype=bf16)
    out = stand.no_fp8_gemm(x, q, None, s, plain_rows=plain)
    same(out, reference.linear(x, q, None, s, plain_rows=plain))
    assert not any(part.any() for part in out)
    assert torch.equal(stand.no_fp8_gemm(x, plain), reference.linear(x, plain))  # a bf16 weight still multiplies
    r = subprocess.run([sys.executable, "scripts/time_without_launches.py", "norms,bogus", "--", "info"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "unknown launch 'bogus' (known: norms, prepare, absorb, attention" in r.stderr
