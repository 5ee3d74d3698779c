"""Chatting with a model from the terminal (`inferctl run`, `chat`) and replaying chats (`replay`).

Plain functions that `inferctl/cli.py` wires into commands, kept out of `cli.py` so they can be
tested in-process and so the CLI module stays cheap to import. The backends (a server over HTTP,
or the engine in this process) are in `chat_backends.py`, `status` in `status_cmds.py`; both are
re-exported here, where callers found them before the split.

Transcripts are JSON lines, one message per line:

    {"role": "user", "content": "...", "started": 1718000000.1, "first_token_s": null,
     "duration_s": 0.0, "chunks": []}
    {"role": "assistant", "content": "...", "started": 1718000000.1, "first_token_s": 0.21,
     "duration_s": 1.4, "chunks": [[0.21, "Hel"], [0.25, "lo"], ...], "model": "tiny",
     "temperature": 0.8, "max_tokens": 256, "cancelled": false}

`started` is wall-clock (epoch seconds) so a transcript can be lined up with server logs; chunk
offsets are seconds since `started`, measured on the monotonic clock, so `replay` can reproduce
the pacing a user saw (time to first token included).

Nothing here imports JAX at module level: a `ServerBackend` chat must start instantly.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from inferctl.chat_backends import (
    ChatBackend,
    LocalBackend,
    Message,
    ServerBackend,
    _one_line,
    backend_for,
    base_url,
)
from inferctl.status_cmds import collect_status, status
from inferflux.errors import InferFluxError

__all__ = ["HELP", "ChatBackend", "LocalBackend", "Message", "ServerBackend", "backend_for", "base_url",
           "collect_status", "read_transcript", "replay", "run", "status"]

HELP = """\
Commands:
  /bye                     leave (Ctrl-D at the prompt does the same)
  /clear                   forget the conversation so far (the transcript keeps it)
  /set temperature VALUE   sampling temperature, 0 = greedy
  /set max_tokens N        longest answer, in tokens
  /set                     show the current settings
  /save FILE               write this session's transcript to FILE as JSON lines
  /help                    this text
Ctrl-C during an answer stops that answer; Ctrl-C at the prompt leaves."""


# --- run: one answer, or the REPL ---


class _Session:
    """History sent to the model, the settings, and the transcript of everything said."""

    def __init__(self, backend: ChatBackend, temperature: float, max_tokens: int, transcript: str | None,
                 out: TextIO) -> None:
        self.backend = backend
        self.temperature = _check_temperature(temperature)
        self.max_tokens = _check_max_tokens(max_tokens)
        self.history: list[dict[str, str]] = []
        self.records: list[dict[str, Any]] = []  # the whole session, /clear included, for /save
        self.transcript = Path(transcript) if transcript else None
        self.out = out

    def ask(self, text: str) -> None:
        """Stream one answer to `text`; Ctrl-C stops the answer and propagates after cleanup.

        A finished or cancelled answer joins the history (what the user saw is what the model
        sees next turn). A failed one leaves the history as it was, so the user can retry.
        """
        messages = [*self.history, {"role": "user", "content": text}]
        asked_wall, asked = time.time(), time.monotonic()
        chunks: list[list[Any]] = []
        cancelled = False
        pieces = self.backend.stream(messages, self.temperature, self.max_tokens)
        finished = False
        try:
            for piece in pieces:
                chunks.append([round(time.monotonic() - asked, 4), piece])
                self.out.write(piece)
                self.out.flush()
            finished = True
        except KeyboardInterrupt:
            cancelled = True
            raise
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # a generator suspended mid-answer must release its request now
            if cancelled:
                self.backend.cancel()
            duration = time.monotonic() - asked
            if cancelled:
                self.out.write("\n[answer cancelled]\n")
            elif finished or chunks:  # an error before any text needs no blank line
                self.out.write("\n")
            self.out.flush()
            if finished or cancelled:
                self._record(text, asked_wall, chunks, duration, cancelled)

    def _record(self, text: str, started: float, chunks: list[list[Any]], duration: float,
                cancelled: bool) -> None:
        answer = "".join(piece for _, piece in chunks)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        records = [
            {"role": "user", "content": text, "started": started, "first_token_s": None, "duration_s": 0.0,
             "chunks": []},
            {"role": "assistant", "content": answer, "started": started,
             "first_token_s": chunks[0][0] if chunks else None, "duration_s": round(duration, 4),
             "chunks": chunks, "model": self.backend.name, "temperature": self.temperature,
             "max_tokens": self.max_tokens, "cancelled": cancelled},
        ]
        self.records += records
        if self.transcript is not None:  # appended turn by turn, so a crash loses at most one turn
            with self.transcript.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    def save(self, file: str) -> int:
        """`/save FILE`: the whole session, written atomically (a failed save keeps the file it replaces)."""
        from inferflux.files import atomic_write

        atomic_write(file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records))
        return len(self.records)


def _number(text: str, kind: type, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{what} must be a {'whole ' if kind is int else ''}number, got {text!r}") from None


def _check_temperature(value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"temperature must be a number >= 0, got {value}")
    return value


def _check_max_tokens(value: int) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"max_tokens must be a whole number, got {value}")
    value = int(value)
    if value < 1:
        raise ValueError(f"max_tokens must be at least 1, got {value}")
    return value


def run(backend: ChatBackend, prompt: str | None = None, temperature: float = 0.8, max_tokens: int = 256,
        transcript: str | None = None) -> None:
    """Answer `prompt` once (streamed to stdout, then a newline), or without one, chat in a REPL.

    With a prompt, errors propagate (the CLI prints one line and exits 1) and Ctrl-C cancels the
    answer, then propagates. In the REPL, an error is printed and the session goes on, and Ctrl-C
    stops only the answer in progress. `transcript` appends every turn to that file as JSON lines.
    """
    session = _Session(backend, temperature, max_tokens, transcript, sys.stdout)
    if prompt is not None:
        session.ask(str(prompt))
        return
    _repl(session)


def _repl(session: _Session) -> None:
    out = sys.stdout
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and arrow-key history for input()
        except ImportError:
            pass
    print(f"Chatting with {session.backend.name}. /help for commands, /bye to leave.", file=out, flush=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out, flush=True)  # leave the terminal on a fresh line
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(session, text) == "bye":
                return
            continue
        try:
            session.ask(line)
        except KeyboardInterrupt:
            continue  # the answer is cancelled and recorded; the session goes on
        except (InferFluxError, ValueError, OSError) as exc:
            print(f"error: {_one_line(exc)}", file=sys.stderr, flush=True)


def _command(session: _Session, text: str) -> str | None:
    """Run one slash command; returns "bye" to end the session. Mistakes print usage, never exit."""
    out = sys.stdout
    name, _, rest = text.partition(" ")
    rest = rest.strip()
    if name in ("/bye", "/exit", "/quit"):
        return "bye"
    if name == "/help" or name == "/?":
        print(HELP, file=out)
    elif name == "/clear":
        session.history.clear()
        print("Conversation cleared.", file=out)
    elif name == "/set":
        key, _, value = rest.partition(" ")
        value = value.strip()
        try:
            if not key:
                print(f"temperature {session.temperature}\nmax_tokens {session.max_tokens}", file=out)
            elif key == "temperature" and value:
                session.temperature = _check_temperature(_number(value, float, "temperature"))
                print(f"temperature set to {session.temperature}", file=out)
            elif key == "max_tokens" and value:
                session.max_tokens = _check_max_tokens(_number(value, int, "max_tokens"))
                print(f"max_tokens set to {session.max_tokens}", file=out)
            else:
                print("usage: /set temperature VALUE | /set max_tokens N", file=out)
        except ValueError as exc:
            print(f"error: {_one_line(exc)}", file=out)
    elif name == "/save":
        if not rest:
            print("usage: /save FILE", file=out)
        else:
            try:
                count = session.save(rest)
                print(f"saved {count} messages to {rest}", file=out)
            except OSError as exc:
                print(f"error: cannot write {rest}: {_one_line(exc.strerror or exc)}", file=out)
    else:
        print(f"unknown command {name}; /help lists the commands", file=out)
    out.flush()
    return None


# --- replay ---


def read_transcript(file: str) -> list[dict[str, Any]]:
    """Parse a transcript, naming the line of any damage (a half-written last line after a crash, say)."""
    records = []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise InferFluxError(f"{file}:{number}: not a JSON line ({_one_line(exc)})") from None
            if not isinstance(record, dict) or "role" not in record or "content" not in record:
                raise InferFluxError(f"{file}:{number}: expected an object with `role` and `content`")
            records.append(record)
    return records


def replay(file: str, speed: float = 1.0) -> None:
    """Print a transcript as it happened: user turns after `>>> `, answers chunk by chunk with their
    original timing (time to first token included) divided by `speed`.

    It exists for demos and for seeing latency: a transcript recorded against a slow server looks
    slow when replayed, which numbers in a table do not convey.
    """
    speed = float(speed)
    if not math.isfinite(speed) or speed <= 0:
        raise ValueError(f"speed must be a number > 0, got {speed}")
    out = sys.stdout
    for record in read_transcript(file):
        role, content = record["role"], str(record["content"])
        if role == "user":
            out.write(f">>> {content}\n")
        elif role == "assistant":
            chunks = record.get("chunks") or [[0.0, content]]
            previous = 0.0
            for offset, piece in chunks:
                delay = (float(offset) - previous) / speed
                if delay > 0:
                    out.flush()
                    time.sleep(delay)
                previous = max(previous, float(offset))
                out.write(str(piece))
            out.write("\n")
        out.flush()
