"""Config validation: every key is range-checked at load, with one line naming the key and the allowed range."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inferflux.config import (
    Check,
    Config,
    ConfigError,
    RuntimeConfig,
    ServerConfig,
    iter_fields,
    load_config,
    validate_config,
)

ROOT = Path(__file__).resolve().parent.parent

# (dotted key, bad value, text the error must contain besides the key)
BAD = [
    ("runtime.max_num_seqs", "-5", "1 to 4096"),
    ("runtime.max_num_seqs", "0", "1 to 4096"),
    ("runtime.max_num_batched_tokens", "0", "1 to"),
    ("runtime.page_size", "0", "1 to 1024"),
    ("runtime.page_size", "-16", "1 to 1024"),
    ("runtime.num_pages", "1", "0, or 2 to"),
    ("runtime.num_pages", "-3", "0, or 2 to"),
    ("runtime.memory_fraction", "5", "more than 0 and at most 1"),
    ("runtime.memory_fraction", "0", "more than 0 and at most 1"),
    ("runtime.memory_fraction", "nan", "more than 0 and at most 1"),
    ("runtime.memory_fraction", "-0.1", "more than 0 and at most 1"),
    ("runtime.max_pages_from_memory", "1", "2 to"),
    ("runtime.max_model_len", "-1", "0, or 1 to"),
    ("runtime.min_token_bucket", "-1", "0, or 1 to"),
    ("runtime.max_compiled_programs", "0", "1 to"),
    ("runtime.page_bucket_growth", "1", "2 to"),
    ("runtime.max_logprobs", "-1", "0 to 1024"),
    ("runtime.max_logit_bias", "-1", "0 to"),
    ("runtime.warmup_threads", "0", "1 to 256"),
    ("runtime.dtype", "fp8", "one of auto, float32, bfloat16, float16"),
    ("runtime.embedding_pooling", "cls", "one of mean, last"),
    ("runtime.seed", "-1", "0 to"),
    ("server.port", "99999", "1 to 65535"),
    ("server.port", "0", "1 to 65535"),
    ("server.ollama_port", "70000", "0, or 1 to 65535"),
    ("server.host", "", "not empty"),
    ("server.drain_seconds", "-1", "0 to 86400"),
    ("server.drain_seconds", "inf", "0 to 86400"),
    ("server.max_body_bytes", "0", "1 to"),
    ("server.max_queued_requests", "-1", "0 to"),
    ("server.default_max_tokens", "-2", "0, or 1 to"),
    ("server.keep_alive", "5 minutes", "duration"),
    ("server.max_loaded_models", "-1", "0 to 1024"),
]


@pytest.mark.parametrize(("dotted", "value", "allowed"), BAD)
def test_bad_value_is_one_line_naming_key_and_range(dotted: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[f"{dotted}={value}"], environ={})
    message = str(info.value)
    assert "\n" not in message
    assert f"{dotted}=" in message and allowed in message and message.startswith("override: ")


GOOD = [
    ("runtime.max_num_seqs", "1"), ("runtime.max_num_seqs", "512"), ("runtime.page_size", "1"),
    ("runtime.num_pages", "0"), ("runtime.num_pages", "2"), ("runtime.memory_fraction", "1"),
    ("runtime.memory_fraction", "0.01"), ("runtime.max_model_len", "0"), ("runtime.max_logprobs", "0"),
    ("runtime.max_logit_bias", "0"), ("runtime.dtype", "bfloat16"), ("runtime.embedding_pooling", "last"),
    ("runtime.min_token_bucket", "512"), ("runtime.max_num_batched_tokens", "32"),
    ("runtime.max_compiled_programs", "1"), ("server.port", "1"), ("server.port", "65535"),
    ("server.ollama_port", "0"), ("server.ollama_port", "11434"), ("server.drain_seconds", "0"),
    ("server.keep_alive", "1h30m"), ("server.keep_alive", "-1"), ("server.keep_alive", "0"),
    ("server.keep_alive", "250ms"), ("server.keep_alive", "300"), ("server.max_loaded_models", "0"),
    ("server.default_max_tokens", "0"),
]


@pytest.mark.parametrize(("dotted", "value"), GOOD)
def test_edge_values_pass(dotted: str, value: str) -> None:
    load_config(overrides=[f"{dotted}={value}"], environ={})


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match=r"min_token_bucket must be <= runtime.max_num_batched_tokens"):
        load_config(overrides=["runtime.min_token_bucket=64", "runtime.max_num_batched_tokens=32"], environ={})
    with pytest.raises(ConfigError, match=r"max_num_seqs must be <= runtime.max_num_batched_tokens"):
        load_config(overrides=["runtime.max_num_seqs=64", "runtime.max_num_batched_tokens=32",
                               "runtime.min_token_bucket=8"], environ={})
    with pytest.raises(ConfigError, match="ollama_port must differ from server.port"):
        load_config(overrides=["server.port=9000", "server.ollama_port=9000"], environ={})
    # Equal values are fine.
    load_config(overrides=["runtime.min_token_bucket=32", "runtime.max_num_batched_tokens=32",
                           "runtime.max_num_seqs=32"], environ={})


def test_environment_and_yaml_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^INFERFLUX_RUNTIME__PAGE_SIZE: runtime.page_size=0 is out of range"):
        load_config(environ={"INFERFLUX_RUNTIME__PAGE_SIZE": "0"})
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("server:\n  port: 99999\n")
    with pytest.raises(ConfigError, match=rf"^{yaml_file}: server.port=99999 is out of range: allowed 1 to 65535"):
        load_config(yaml_file, environ={})
    # A later source that fixes the value wins: only the final value is checked.
    assert load_config(yaml_file, overrides=["server.port=9000"], environ={}).server.port == 9000


def test_several_bad_values_are_all_named_on_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["runtime.page_size=0", "server.port=99999"], environ={})
    assert "runtime.page_size" in str(info.value) and "server.port" in str(info.value)
    assert "\n" not in str(info.value)


def test_every_key_declares_its_allowed_values() -> None:
    """Every key of every section carries a Check; numbers are bounded on both sides; defaults pass."""
    for section in (Config, RuntimeConfig, ServerConfig):
        for f in dataclasses.fields(section):
            if f.default_factory is dataclasses.MISSING:  # sections themselves are default_factory fields
                assert isinstance(f.metadata.get("check"), Check), f"{section.__name__}.{f.name} declares no Check"
    for dotted, value, kind, check in iter_fields(Config()):
        if kind in (int, float):
            assert check.lo is not None and check.hi is not None, dotted
        assert check.allows(value), f"the default of {dotted} is outside its own range"


def test_configs_built_in_python_are_checked_too() -> None:
    config = Config()
    config.runtime.page_size = 0
    with pytest.raises(ConfigError, match="runtime.page_size=0"):
        validate_config(config)
    config = Config()
    config.runtime.max_num_seqs = True  # a bool is not an int here
    with pytest.raises(ConfigError, match="runtime.max_num_seqs must be int"):
        validate_config(config)


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "INFERFLUX_HOME": str(home), "JAX_PLATFORMS": "cpu"}
    code = ("import sys; from inferctl.cli import main; rc = main(sys.argv[1:]); "
            "print('jax imported' if 'jax' in sys.modules else 'jax not imported'); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize(("flags", "key"), [
    (["--set", "runtime.max_num_seqs=-5"], "runtime.max_num_seqs=-5"),
    (["--set", "runtime.page_size=0"], "runtime.page_size=0"),
    (["--port", "99999"], "server.port=99999"),
])
def test_cli_rejects_bad_values_in_one_line_before_loading(tmp_path: Path, flags: list[str], key: str) -> None:
    """`inferctl serve` exits 1 with one line, without a traceback, before importing JAX or reading the model."""
    start = time.monotonic()
    result = _cli("serve", str(tmp_path / "no-such-model"), *flags, home=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and lines[0].startswith("inferctl: error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout.strip() == "jax not imported"
    assert time.monotonic() - start < 60
