# Run: python -m pytest -q tests/test_docs.py   (runs the documented examples; starts two servers)
"""The Python examples of README.md and docs/server.md that are marked `<!-- example: KIND -->` run as
written: `offline` ones on their own, `server` ones against a server of the shipped model and
`tools-server` ones against a server of a checkpoint with tool calls (tests/tool_model.py), with the
documented address replaced by the test server's. And the Grafana dashboard charts series that exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from server_process import ROOT, start_server, stop_server
from tool_model import make_tool_checkpoint

pytest.importorskip("openai")
pytest.importorskip("fastapi")

EXAMPLE = re.compile(r"<!-- example: ([\w-]+) -->\n```python\n(.*?)```", re.S)
DOCS = ("README.md", "docs/server.md")


def examples(kind: str) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            found += [(f"{doc}#{i}", code) for i, (k, code) in enumerate(EXAMPLE.findall(f.read())) if k == kind]
    return found


def run_example(code: str, url: str | None = None) -> str:
    if url is not None:
        code = code.replace("http://127.0.0.1:8000", url)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_every_example_has_a_known_kind():
    kinds = {k for doc in DOCS for k, _ in EXAMPLE.findall(open(os.path.join(ROOT, doc), encoding="utf-8").read())}
    assert kinds == {"offline", "server", "tools-server"}


@pytest.mark.parametrize("name, code", examples("offline"), ids=[n for n, _ in examples("offline")])
def test_offline_examples(name, code):
    run_example(code)


def test_server_examples():
    proc, url, _ = start_server("--num-kv-blocks", "128")
    try:
        for name, code in examples("server"):
            out = run_example(code, url)
            assert out.strip(), name
    finally:
        stop_server(proc)


def test_tool_examples(tmp_path):
    checkpoint = make_tool_checkpoint(tmp_path / "v25")
    proc, url, _ = start_server("--model", checkpoint, "--num-kv-blocks", "128", "--served-model-name", "deepseek-v2.5")
    try:
        for name, code in examples("tools-server"):
            first = run_example(code, url).splitlines()[0]
            assert first.startswith("tool_calls get_weather {"), (name, first)
    finally:
        stop_server(proc)


def test_grafana_dashboard_charts_existing_series():
    from deepseek_v2.server.metrics import ServerMetrics
    with open(os.path.join(ROOT, "docs", "grafana-dashboard.json"), encoding="utf-8") as f:
        dashboard = json.load(f)
    text = ServerMetrics("m").render({})
    names = {line.split(" ")[2] for line in text.splitlines() if line.startswith("# TYPE")}
    series = set(names)
    for n in names:  # a histogram's series, a counter's _total
        series |= {n + "_bucket", n + "_sum", n + "_count", n + "_total"}
    charted = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"deepseek_v2:\w+", t["expr"])}
    assert charted and charted <= series, charted - series
    assert {"time_to_first_token_seconds", "kv_cache_usage_perc", "num_requests_waiting"} <= {
        m.removeprefix("deepseek_v2:").removesuffix("_bucket") for m in charted}
