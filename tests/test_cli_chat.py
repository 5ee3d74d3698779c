"""Chatting from the terminal (`run`, `replay`) and `status`, against a real server, a local model and a pty."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import openai
import pytest

from inferctl import chat_cmds
from inferctl.chat_cmds import LocalBackend, ServerBackend, replay, run, status
from inferflux.errors import InferFluxError
from tests.fixtures.server import Server, free_port


@pytest.fixture(autouse=True)
def ctrl_c_raises() -> Iterator[None]:
    """These tests press Ctrl-C: give this process Python's default SIGINT handler while each runs.

    A test run started in the background of a shell without job control (`cmd &`, `nohup`) inherits SIGINT
    ignored; Python then leaves it ignored, and so do the REPL children spawned from here (an ignored signal
    stays ignored across exec), so Ctrl-C did nothing. A handler, unlike SIG_IGN, is reset to the default by
    exec, so the children get the terminal's Ctrl-C too. (inferctl itself rightly keeps an ignored SIGINT
    ignored, as Unix programs do.)
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Tell me about llamas."
MESSAGES = [{"role": "user", "content": QUESTION}]


def greedy(client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int) -> str:
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                          temperature=0).choices[0].message.content


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_timing(record: dict) -> None:
    """A transcript record can be replayed: chunks rebuild the content, offsets grow within the duration."""
    assert "".join(text for _, text in record["chunks"]) == record["content"]
    offsets = [t for t, _ in record["chunks"]]
    assert offsets == sorted(offsets) and offsets[0] == record["first_token_s"]
    assert 0 <= record["first_token_s"] <= record["duration_s"]


# --- one answer ---


def test_run_prompt_against_server(server, client, capsys, tmp_path: Path) -> None:
    backend = ServerBackend(server.url + "/v1/")  # the base URL OpenAI clients use works too
    assert backend.model == "tiny" and backend.max_model_len == 256  # the first of /v1/models
    log = tmp_path / "chat.jsonl"
    run(backend, QUESTION, temperature=0, max_tokens=12, transcript=str(log))
    expected = greedy(client, MESSAGES, 12)
    assert expected and capsys.readouterr().out == expected + "\n"
    user, answer = read_lines(log)
    assert (user["role"], user["content"]) == ("user", QUESTION)
    assert (answer["role"], answer["content"], answer["model"]) == ("assistant", expected, "tiny")
    check_timing(answer)
    # A long chat is fitted to the context rather than refused (the server answers 400 to prompt +
    # max_tokens over the context): a prompt near the 256-token context, 10_000 tokens asked.
    long = [{"role": "user", "content": QUESTION * 17}]
    count = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": long}, timeout=120).json()["count"]
    assert 200 < count < 256
    run(backend, QUESTION * 17, temperature=0, max_tokens=10_000)
    assert capsys.readouterr().out.strip()

    # cancel() mid-answer ends the stream at once (greedy would go on for 200 tokens), without an error.
    pieces = backend.stream(MESSAGES, 0.0, 200)
    assert next(pieces)
    backend.cancel()
    assert list(pieces) == []


def test_run_prompt_in_process(tiny_model, capsys) -> None:
    from inferflux import SamplingParams

    backend = LocalBackend(str(tiny_model("llama")), max_model_len=256, num_pages=64)
    run(backend, QUESTION, temperature=0, max_tokens=12)
    expected = backend.llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert expected and capsys.readouterr().out == expected + "\n"
    engine = backend.llm.engine

    # cancel() mid-answer aborts the request and frees its pages.
    pieces = backend.stream(MESSAGES, 0.0, 200)
    assert next(pieces)
    assert engine.has_unfinished
    backend.cancel()
    assert not engine.has_unfinished and backend.llm.allocator.num_used == 0

    # Ctrl-C arriving inside a step is held until the step is done, then cancels only the answer.
    real_step, steps = engine.step, []

    def interrupted_step():
        signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C mid-step
        result = real_step()
        steps.append("completed")
        return result

    engine.step = interrupted_step
    try:
        with pytest.raises(KeyboardInterrupt):
            run(backend, QUESTION, temperature=0, max_tokens=50)
    finally:
        engine.step = real_step
    assert steps == ["completed"]
    assert capsys.readouterr().out.endswith("[answer cancelled]\n")
    assert not engine.has_unfinished and backend.llm.allocator.num_used == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- the REPL ---


class Recorder:
    """A backend that answers "answer N" and remembers every conversation it was sent."""

    name = "recorder"

    def __init__(self) -> None:
        self.sent: list[list[dict[str, str]]] = []
        self.settings: list[tuple[float, int]] = []

    def stream(self, messages: Sequence[dict[str, str]], temperature: float, max_tokens: int) -> Iterator[str]:
        self.sent.append(list(messages))
        self.settings.append((temperature, max_tokens))
        yield "answer "
        yield str(len(self.sent))

    def cancel(self) -> None:
        pass


def test_repl_history_and_commands(monkeypatch, capsys, tmp_path: Path) -> None:
    backend = Recorder()
    script = "hi\n\n/set max_tokens 7\n/set temperature -1\n/set max_tokens x\nagain\n/clear\n/nonsense\nthird\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    run(backend, None, temperature=0.5, max_tokens=3, transcript=str(tmp_path / "t.jsonl"))
    assert [len(m) for m in backend.sent] == [1, 3, 1]  # history kept, then forgotten by /clear
    assert backend.sent[1] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "answer 1"},
                               {"role": "user", "content": "again"}]
    assert backend.settings == [(0.5, 3), (0.5, 7), (0.5, 7)]  # a bad /set changes nothing
    out = capsys.readouterr().out
    assert "answer 1\n" in out and "unknown command /nonsense" in out and "temperature must be" in out
    assert "max_tokens must be a whole number, got 'x'" in out
    assert len(read_lines(tmp_path / "t.jsonl")) == 6  # every turn, /clear or not


# Spawning a pty forks this (JAX-threaded) process; the child execs at once, so the warning does not apply.
pty_test = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")


def spawn(code: str, *args: str, timeout: int = 60):
    import pexpect

    child = pexpect.spawn(sys.executable, ["-c", code, *args], cwd=str(REPO), encoding="utf-8",
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), "TERM": "dumb"})
    child.expect_exact(">>> ")
    return child


def spawn_repl(server: Server):
    """`inferctl run --url URL` in a pseudo-terminal, as a user types it.

    Greedy first, so the first answer is known to be non-empty (the random model may sample EOS).
    """
    return spawn("import sys; from inferctl.cli import main; sys.exit(main(sys.argv[1:]))",
                 "run", "--url", server.url, "--temperature", "0", "--max-tokens", "8")


def test_inferctl_run_with_prompt_streams_and_exits(tmp_path: Path, tiny_model) -> None:
    """`inferctl run NAME --prompt hi` on a stored model, in-process engine: text out, exit 0."""
    env = {**os.environ, "INFERFLUX_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "inferctl.cli"]
    pulled = subprocess.run([*cli, "pull", str(tiny_model("llama")), "--name", "demo"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    result = subprocess.run([*cli, "run", "demo", "--prompt", "hi", "--temperature", "0", "--max-tokens", "8",
                             "--set", "runtime.max_model_len=128", "--set", "runtime.num_pages=32"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "Traceback" not in result.stderr
    # The banner names the model as the user did, not the store's content hash (`sha256-...`, a folder digest).
    chat = subprocess.run([*cli, "run", "demo", "--set", "runtime.max_model_len=128", "--set", "runtime.num_pages=32"],
                          env=env, input="/bye\n", capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.startswith("Chatting with demo. "), chat.stdout
    missing = subprocess.run([*cli, "run", "nope", "--prompt", "hi"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr


# `pip install -e .` has no `openai` package (only the test extra does); this makes it missing in the child.
WITHOUT_OPENAI = ("import sys; sys.modules['openai'] = None; from inferctl.cli import main; "
                  "sys.exit(main(sys.argv[1:]))")


def test_run_and_chat_with_url_need_no_openai_package(server, client) -> None:
    """`inferctl run --url` and `chat --url` after the README's install: the same answer the real client gets."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    expected = greedy(client, MESSAGES, 12)
    once = subprocess.run([sys.executable, "-c", WITHOUT_OPENAI, "run", "--url", server.url, "--prompt", QUESTION,
                           "--temperature", "0", "--max-tokens", "12"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert once.returncode == 0 and "Traceback" not in once.stderr, once.stderr
    assert once.stdout == expected + "\n"
    chat = subprocess.run([sys.executable, "-c", WITHOUT_OPENAI, "chat", "--url", server.url, "--temperature", "0",
                           "--max-tokens", "12"], env=env, input=f"{QUESTION}\n/bye\n", capture_output=True,
                          text=True, timeout=300)
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr
    assert chat.stdout.startswith("Chatting with tiny. ") and f">>> {expected}\n>>> " in chat.stdout
    refused = subprocess.run([sys.executable, "-c", WITHOUT_OPENAI, "run", "nope", "--url", server.url, "--prompt",
                              "hi"], env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "HTTP 404" in refused.stderr and "nope" in refused.stderr


def terminal_text(text: str) -> str:
    """Text as compared across a terminal: no escape sequences, no carriage returns (the pty adds them)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


def answer_shown(child) -> str:
    """What the terminal showed between the echoed question and the next prompt."""
    child.expect_exact(">>> ")
    return terminal_text(child.before).split("\n", 1)[1]  # drop the echoed input line


@pty_test
def test_repl_through_a_terminal(server, capsys, tmp_path: Path) -> None:
    import pexpect

    saved = tmp_path / "session.jsonl"
    child = spawn_repl(server)
    try:
        child.sendline(QUESTION)
        first = answer_shown(child)
        child.sendline("/set temperature 0.2")
        child.expect_exact("temperature set to 0.2")
        child.expect_exact(">>> ")
        child.sendline("And alpacas?")
        second = answer_shown(child)
        child.sendline(f"/save {saved}")
        child.expect_exact("saved 4 messages")
        child.expect_exact(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    records = read_lines(saved)
    assert [r["role"] for r in records] == ["user", "assistant", "user", "assistant"]
    assert [records[0]["content"], records[2]["content"]] == [QUESTION, "And alpacas?"]
    assert [records[1]["temperature"], records[3]["temperature"]] == [0.0, 0.2]
    a1, a2 = records[1]["content"], records[3]["content"]
    assert a1 and first == terminal_text(a1 + "\n") and second == terminal_text(a2 + "\n")
    for record in records[1::2]:
        check_timing(record)

    replay(str(saved), speed=1000)
    assert capsys.readouterr().out == f">>> {QUESTION}\n{a1}\n>>> And alpacas?\n{a2}\n"


@pty_test
def test_repl_ctrl_c_at_the_prompt_exits_cleanly(server) -> None:
    import pexpect

    child = spawn_repl(server)
    try:
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


SLOW_BACKEND = """
import sys, time
from inferctl.chat_cmds import run

class Slow:
    name = "slow"

    def stream(self, messages, temperature, max_tokens):
        yield "first"
        for _ in range(600):
            time.sleep(0.05)
            yield "."

    def cancel(self):
        print("[backend cancelled]", flush=True)

run(Slow(), None, transcript=sys.argv[1])
"""


@pty_test
def test_repl_ctrl_c_cancels_the_answer_not_the_session(tmp_path: Path) -> None:
    """Ctrl-C typed into the terminal mid-answer (a 30 s answer, so no race): cancelled, recorded, next prompt."""
    import pexpect

    log = tmp_path / "t.jsonl"
    child = spawn(SLOW_BACKEND, str(log))
    try:
        child.sendline("go")
        child.expect_exact("first")
        child.sendintr()
        child.expect_exact("[backend cancelled]")
        child.expect_exact("[answer cancelled]")
        child.expect_exact(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    user, answer = read_lines(log)
    assert user["content"] == "go" and answer["cancelled"] is True
    assert answer["content"].startswith("first") and answer["duration_s"] < 20


def test_replay_keeps_the_pacing(monkeypatch, capsys, tmp_path: Path) -> None:
    transcript = tmp_path / "t.jsonl"
    records = [{"role": "user", "content": "hi", "started": 0, "first_token_s": None, "duration_s": 0,
                "chunks": []},
               {"role": "assistant", "content": "Hello!", "started": 0, "first_token_s": 0.5, "duration_s": 1.0,
                "chunks": [[0.5, "Hel"], [0.75, "lo"], [1.0, "!"]]}]
    transcript.write_text("".join(json.dumps(r) + "\n" for r in records))
    sleeps: list[float] = []
    monkeypatch.setattr(chat_cmds.time, "sleep", sleeps.append)
    replay(str(transcript), speed=2)
    assert capsys.readouterr().out == ">>> hi\nHello!\n"
    assert sleeps == [0.25, 0.125, 0.125]  # time to first token included, divided by the speed
    with pytest.raises(ValueError, match="speed"):
        replay(str(transcript), speed=0)
    transcript.write_text('{"role": "user", "content": "hi"}\n{"role": "assis')  # cut off mid-write
    with pytest.raises(InferFluxError, match=r"t\.jsonl:2"):
        replay(str(transcript))


# --- status ---


def test_status(server, client, capsys) -> None:
    stop = threading.Event()

    def keep_generating() -> None:
        while not stop.is_set():
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0)

    worker = threading.Thread(target=keep_generating)
    worker.start()
    try:
        status(server.url, window=1.0)
        table = capsys.readouterr().out
        status(server.url, as_json=True, window=1.0)
        info = json.loads(capsys.readouterr().out)
    finally:
        stop.set()
        worker.join()
    assert "tiny" in table and re.search(r"readiness\s+ready", table) and "tokens/s" in table
    assert info["ready"] and info["healthy"] and info["readiness"] == "ready"
    assert info["models"] == [{"id": "tiny", "max_model_len": 256}]
    assert info["generation_tokens_total"] > 0 and info["generation_tokens_per_s"] > 0
    assert 0 <= info["kv_cache_usage_perc"] <= 100 and info["requests_waiting"] >= 0
    assert 0 <= info["prefix_cache_hit_rate"] <= 1  # the same prompt over and over hits the cache


@pytest.mark.parametrize("call", [lambda url: status(url), lambda url: status(url, as_json=True),
                                  lambda url: ServerBackend(url)], ids=["status", "status-json", "backend"])
def test_unreachable_server_is_one_line(call) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # bound, then closed: nothing listens there
    with pytest.raises(InferFluxError) as info:
        call(url)
    message = str(info.value)
    assert message.startswith(f"cannot reach the server at {url}: ") and "\n" not in message


def test_backend_for_refuses_settings_that_cannot_apply() -> None:
    from inferctl.chat_cmds import backend_for

    with pytest.raises(ValueError, match="local model"):
        backend_for("http://127.0.0.1:1", max_model_len=256)
    with pytest.raises(ValueError, match="--model"):
        backend_for("model.gguf", model="tiny")
