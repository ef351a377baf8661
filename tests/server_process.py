"""Start and stop `python -m deepseek_v2.server.cli` on a free local port for the server tests, and
read its metrics."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def start_server(*args: str, script: str | None = None, new_session: bool = False) -> tuple[subprocess.Popen, str, str]:
    """A server with the bundled model (fp32, CPU) on a free port, once /health answers 200;
    returns (process, base URL, log path). Extra CLI arguments come after the defaults. `script`:
    a file under tests/ to run instead of the serve command (one that injects faults, say); new_session:
    its own process group (for a signal to the group, as a terminal's Ctrl-C sends)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"deepseek_v2_server_{port}.log")
    entry = ["-m", "deepseek_v2.server.cli"] if script is None else [os.path.join(ROOT, "tests", script)]
    cmd = [sys.executable, *entry, "--port", str(port), "--dtype", "float32",
           "--device", "cpu", "--log-level", "warning", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a small model: one thread, no contention with pytest
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=new_session)
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


def series(text: str, name: str, **labels: str) -> float:
    """The sum of the deepseek_v2:<name> series of a /metrics text whose labels include `labels`
    (whatever the labels' order)."""
    out = 0.0
    for line in text.splitlines():
        if line.startswith(f"deepseek_v2:{name}{{"):
            head, value = line.rsplit(" ", 1)
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', head))
            if all(found.get(k) == v for k, v in labels.items()):
                out += float(value)
    return out


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics as {series name with its labels: value}."""
    lines = httpx.get(url + "/metrics").text.splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and line[0] != "#"}


def metric(url: str, name: str) -> float:
    """The value of deepseek_v2:<name> (its first series)."""
    return next(v for k, v in metrics(url).items() if k.startswith(f"deepseek_v2:{name}{{"))


def total(url: str, selector: str) -> float:
    """The sum of the series whose name and labels contain `selector` (0 if none yet)."""
    return sum(v for k, v in metrics(url).items() if selector in k)


def wait_until_idle(url: str, timeout: float = 5.0) -> dict[str, float]:
    """The metrics once nothing runs or waits and every cache block is free (aborted requests free
    theirs at the next step); AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        m = {k.split("{")[0].removeprefix("deepseek_v2:"): v for k, v in metrics(url).items()}
        if (m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0
                and m["kv_cache_free_blocks"] == m["kv_cache_total_blocks"]):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still hold cache blocks: {m}")
        time.sleep(0.05)
