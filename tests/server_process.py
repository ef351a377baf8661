"""Start and stop `python -m deepseek_v2.server.cli` on a free local port for the server tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def start_server(*args: str, script: str | None = None) -> tuple[subprocess.Popen, str, str]:
    """A server with the bundled model (fp32, CPU) on a free port, once /health answers 200;
    returns (process, base URL, log path). Extra CLI arguments come after the defaults. `script`:
    a file under tests/ to run instead of the serve command (one that injects faults, say)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"deepseek_v2_server_{port}.log")
    entry = ["-m", "deepseek_v2.server.cli"] if script is None else [os.path.join(ROOT, "tests", script)]
    cmd = [sys.executable, *entry, "--port", str(port), "--dtype", "float32",
           "--device", "cpu", "--log-level", "warning", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a small model: one thread, no contention with pytest
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{read(log)}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not become healthy:\n{read(log)}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
