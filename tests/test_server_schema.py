# Run: python -m pytest -q tests/test_server_schema.py   (starts a server subprocess; needs schemathesis)
"""`/openapi.json` tells the truth: a few of its promises checked by hand, then Schemathesis sends
requests generated from it, valid and invalid, and checks every answer against it: no 5xx, only
documented statuses, content types and headers, bodies (and each streamed event) of the documented
shape, invalid requests refused. A bounded run: 25 examples per operation from a fixed seed (a rerun
finds the same), on a server whose limits keep each request cheap (a 32-token context, few choices).
To explore further by hand: `schemathesis run http://127.0.0.1:8000/openapi.json` against a server."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from server_process import start_server, stop_server

pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def server():
    proc, url, _ = start_server("--max-model-len", "32", "--num-kv-blocks", "64", "--block-size", "16",
                                "--max-num-seqs", "16", "--max-prompts-per-request", "4",
                                "--max-choices-per-request", "4")
    yield url
    stop_server(proc)


def test_the_schema_documents_what_the_server_does(server):
    spec = httpx.get(server + "/openapi.json").json()
    operations = [op for path in spec["paths"].values() for op in path.values()]
    assert all("422" not in op["responses"] for op in operations)  # FastAPI's; this server answers 400
    completions = spec["paths"]["/v1/completions"]["post"]["responses"]
    assert completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    schemas = spec["components"]["schemas"]
    assert all(member.get("minLength", member.get("minItems")) == 1
               for member in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"])
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    assert schemas["CompletionRequest"]["properties"]["seed"]["anyOf"][0]["maximum"] == 2**63 - 2**16  # exact
    assert httpx.get(server + "/metrics").headers["content-type"].startswith("text/plain")


def test_schemathesis_finds_no_failure(server, tmp_path):
    # Excluded: positive_data_acceptance, which wants a 2xx for every request the schema allows; the
    # engine's rules that a JSON schema cannot express (a token id past the vocabulary, a prompt
    # longer than the context) answer such requests with 400, which the schema documents.
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server + "/openapi.json", "--max-examples", "25",
           "--seed", "1", "--exclude-checks", "positive_data_acceptance", "--request-timeout", "60",
           "--no-color"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its files go there
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]


def test_unknown_fields_are_logged_once_and_refused_vllm_fields_name_themselves(caplog):
    from deepseek_v2.server.errors import APIError
    from deepseek_v2.server.protocol import CompletionRequest
    with caplog.at_level("WARNING", logger="deepseek_v2"):
        for _ in range(2):
            CompletionRequest(prompt="hi", frobnicate_twice=1, request_id="mine").to_sampling_params()
    logged = [r.getMessage() for r in caplog.records if "frobnicate_twice" in r.getMessage()]
    assert len(logged) == 1 and not any("request_id" in r.getMessage() for r in caplog.records)
    with pytest.raises(APIError) as info:
        CompletionRequest(prompt="hi", logits_processors=["mine"]).to_sampling_params()
    assert info.value.param == "logits_processors" and info.value.status == 400
    CompletionRequest(prompt="hi", logits_processors=[], priority=0).to_sampling_params()  # unset: accepted
