"""The contract, fuzzed: schemathesis against `/openapi.json` of a live server, every route of every dialect.

Checks: no 5xx, status codes and content types as documented, error bodies in the documented shape,
and the server still healthy afterwards. `server.accept_any_model` lets generated bodies reach the
generation path instead of stopping at "unknown model". `/api/pull` is left out: a generated path
such as "/" would be hashed into the store (its behaviour is tested in test_ollama_store.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import Server

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def fuzz_server(tiny_model):
    srv = Server(tiny_model("llama"), "tiny", extra=["server.accept_any_model=true", "server.admin_enabled=false",
                                                     "server.default_max_tokens=8"])
    yield srv
    assert srv.stop() == 0, srv.output()


def test_openapi_document_lists_every_dialect(fuzz_server) -> None:
    doc = httpx.get(fuzz_server.url + "/openapi.json", timeout=60).json()
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/chat", "/api/generate",
                 "/api/embed", "/api/v0/chat/completions", "/api/v0/models", "/healthz", "/tokenize"):
        assert path in paths, path
    chat = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert chat.endswith("/ChatCompletionRequest") and "ChatCompletionRequest" in doc["components"]["schemas"]
    assert "/api/chat" in paths and "ChatRequest" in doc["components"]["schemas"]


def _schemathesis(server: Server, tmp_path: Path, checks: str = CHECKS, extra: tuple[str, ...] = ()) -> str:
    """Run schemathesis against `server`; its output (the test log keeps the tail)."""
    report = tmp_path / "report.json"
    args = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json", "--checks", checks,
            "--max-examples", "6", "--seed", "7", "--workers", "1", "--request-timeout", "120",
            "--phases", "examples,coverage,fuzzing", "--no-color", "--exclude-path", "/api/pull",
            "--report", "json", "--report-json-path", str(report), *extra]
    run = subprocess.run(args, capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    out = run.stdout + run.stderr
    cases = re.search(r"(\d+) generated", out)
    print(out[-3000:])  # kept in the test log: examples tried, failures found
    assert run.returncode == 0, out[-6000:] + "\n--- server ---\n" + server.output()
    assert cases is not None and int(cases.group(1)) > 100, out[-2000:]
    return out


@pytest.mark.slow
def test_schemathesis_with_auth_required(tiny_model, tmp_path: Path) -> None:
    """The same fuzz with security.auth=required and an all-scopes key, plus schemathesis' `ignored_auth`
    check (every route the document says needs a key answers 401 without one). /admin/reload is left out:
    a generated model path would be loaded."""
    from inferflux.server.access.keys import KeyStore
    from inferflux.server.access.scopes import SCOPES
    from tests.fixtures.server import private_home

    home = private_home()
    store = KeyStore.at_home(home)
    store.create_tenant("fuzz")
    key, _ = store.create_key("fuzz", list(SCOPES))
    store.close()
    srv = Server(tiny_model("llama"), "tiny", home=home,
                 extra=["security.auth=required", "server.accept_any_model=true", "server.default_max_tokens=8"])
    try:
        _schemathesis(srv, tmp_path, CHECKS + ",ignored_auth",
                      ("--header", f"Authorization: Bearer {key}", "--exclude-path", "/admin/reload"))
        assert httpx.get(srv.url + "/healthz", timeout=60).status_code == 200
    finally:
        assert srv.stop() == 0, srv.output()


@pytest.mark.slow
def test_schemathesis_finds_no_contract_violation(fuzz_server, tmp_path: Path) -> None:
    _schemathesis(fuzz_server, tmp_path)
    assert httpx.get(fuzz_server.url + "/healthz", timeout=60).status_code == 200
    # Still generating after the fuzz (no engine left dead by a generated body).
    ok = httpx.post(fuzz_server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                    timeout=120)
    assert ok.status_code == 200 and json.loads(ok.text)["choices"][0]["finish_reason"] == "length"
