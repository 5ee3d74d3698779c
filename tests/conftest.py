"""Session-wide fixtures: tiny tokenizers and models, each built once per run.

Everything a test reads is made here from random weights and small trained
tokenizers; nothing is downloaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# CPU only, and one INFERFLUX_HOME for the run, so JAX's persistent compilation cache
# ($INFERFLUX_HOME/xla-cache) is shared by every test and kept between runs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("INFERFLUX_HOME", os.path.join(tempfile.gettempdir(), "inferflux-test-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.fixtures import tokenizers as tok_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byte-level BPE tokenizer with Llama-3's pre-tokenizer and special tokens."""
    return tok_fixtures.make_llama3_bpe_tokenizer(tmp_path_factory.mktemp("tok-llama3"))


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byte-level BPE tokenizer with Qwen2's pre-tokenizer and special tokens."""
    return tok_fixtures.make_qwen2_bpe_tokenizer(tmp_path_factory.mktemp("tok-qwen2"))


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SentencePiece (Llama-2 / Mistral style) tokenizer with byte fallback."""
    return tok_fixtures.make_spm_tokenizer(tmp_path_factory.mktemp("tok-spm"))


@pytest.fixture(scope="session")
def tokenizer_dirs(
    llama3_tokenizer_dir: Path, qwen2_tokenizer_dir: Path, spm_tokenizer_dir: Path
) -> dict[str, Path]:
    return {"llama3": llama3_tokenizer_dir, "qwen2": qwen2_tokenizer_dir, "spm": spm_tokenizer_dir}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dirs: dict[str, Path]):
    """`tiny_model(name)` -> Hugging Face folder of a tiny random model (built once per name)."""
    from tests.fixtures.models import TINY_MODELS, make_tiny_model

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            tokenizer_key = TINY_MODELS[name][2]
            built[name] = make_tiny_model(name, tmp_path_factory.mktemp(f"model-{name}"), tokenizer_dirs[tokenizer_key])
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_model):
    """`tiny_gguf(name, out_type)` -> GGUF file converted from `tiny_model(name)` by our converter."""
    from inferflux.convert.hf_to_gguf import convert_hf_to_gguf

    built: dict[tuple[str, str], Path] = {}
    out_dir = tmp_path_factory.mktemp("gguf")

    def get(name: str, out_type: str = "F32") -> Path:
        key = (name, out_type)
        if key not in built:
            built[key] = convert_hf_to_gguf(tiny_model(name), out_dir / f"{name}-{out_type}.gguf", out_type)
        return built[key]

    return get


@pytest.fixture(scope="module")
def server(tiny_model):
    """`inferctl serve` on the tiny llama model as "tiny", one per test module."""
    from tests.fixtures.server import Server

    srv = Server(tiny_model("llama"), "tiny")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    """The real `openai` client pointed at `server`."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def redis_base_url():
    """The URL of one real redis-server for the run (tests/fixtures/redis_server.py)."""
    from tests.fixtures.redis_server import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture
def redis_url(redis_base_url: str) -> str:
    """A Redis URL with a database index of this test's own, empty."""
    from tests.fixtures.redis_server import fresh_db

    return fresh_db(redis_base_url)
