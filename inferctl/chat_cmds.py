"""Chatting with a model from the terminal, replaying chats, and a server's status at a glance.

Plain functions that `inferctl` wires into its fire CLI (`run`, `replay`, `status`), kept out of
`cli.py` so they can be tested in-process and so the CLI module stays cheap to import.

Two backends speak the same small protocol (`ChatBackend`): `ServerBackend` streams from any
OpenAI-compatible server over HTTP, `LocalBackend` loads the model in this process and steps the
engine itself. `run` does not know which one it talks to; that is what lets the same REPL serve
"try this file" and "poke the running server".

Transcripts are JSON lines, one message per line:

    {"role": "user", "content": "...", "started": 1718000000.1, "first_token_s": null,
     "duration_s": 0.0, "chunks": []}
    {"role": "assistant", "content": "...", "started": 1718000000.1, "first_token_s": 0.21,
     "duration_s": 1.4, "chunks": [[0.21, "Hel"], [0.25, "lo"], ...], "model": "tiny",
     "temperature": 0.8, "max_tokens": 256, "cancelled": false}

`started` is wall-clock (epoch seconds) so a transcript can be lined up with server logs; chunk
offsets are seconds since `started`, measured on the monotonic clock, so `replay` can reproduce
the pacing a user saw (time to first token included).

Nothing here imports JAX at module level: a `ServerBackend` chat or `status` must start instantly.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO, runtime_checkable

import httpx

from inferflux.errors import InferFluxError

if TYPE_CHECKING:
    from inferflux.config import Config

Message = Mapping[str, str]

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

# Connecting must fail fast (a wrong port should not hang the terminal); reading must not time out,
# because a CPU server can take minutes before the first token of a long prompt, and Ctrl-C cancels.
_TIMEOUT = httpx.Timeout(None, connect=5.0)
_STATUS_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def _one_line(value: object) -> str:
    """Errors reach the user as one line (`inferctl: error: ...`); library messages may hold newlines."""
    return " ".join(str(value).split())


def base_url(url: str) -> str:
    """Normalize what a user types for a server: `host:port`, a trailing `/`, or the `/v1` base URL
    that OpenAI clients are configured with, all mean the server's root."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url.removesuffix("/v1")


def _unreachable(url: str, exc: BaseException) -> InferFluxError:
    return InferFluxError(f"cannot reach the server at {url}: {_one_line(exc) or type(exc).__name__}")


# --- backends ---


@runtime_checkable
class ChatBackend(Protocol):
    """Something that answers a conversation as a stream of text pieces.

    `run` only needs these three members, so a test (or a future backend, e.g. a remote
    WebSocket) can stand in for a server or a local model.
    """

    name: str  # what the user is talking to, for the banner and the transcript

    def stream(self, messages: Sequence[Message], temperature: float, max_tokens: int) -> Iterator[str]:
        """Yield the assistant's answer to `messages` piece by piece, as it is produced."""
        ...

    def cancel(self) -> None:
        """Abort the answer in flight, freeing its server-side (or engine) resources now."""
        ...


class ServerBackend:
    """Chat with an OpenAI-compatible server (InferFlux, vLLM, llama.cpp's server, ...) over HTTP.

    The model defaults to the first one `/v1/models` lists, so `inferctl run http://host:8080`
    needs no model name. Asking `/v1/models` at construction also checks the server is there
    before the REPL shows its first prompt.
    """

    def __init__(self, url: str, model: str | None = None) -> None:
        import openai

        self.url = base_url(url)
        cards = self._models()
        if model is None:
            if not cards:
                raise InferFluxError(f"the server at {self.url} serves no models")
            model = str(cards[0]["id"])
        self.model = model
        self.name = model
        card = next((c for c in cards if c.get("id") == model), None)
        # vLLM and InferFlux both publish max_model_len; with it, answers can be fitted to the context.
        self.max_model_len: int | None = card.get("max_model_len") if card else None
        self._client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=_TIMEOUT)
        self._stream: Any = None
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    def _models(self) -> list[dict[str, Any]]:
        try:
            resp = httpx.get(self.url + "/v1/models", timeout=_STATUS_TIMEOUT)
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from None
        if resp.status_code != 200:
            raise InferFluxError(f"the server at {self.url} answered /v1/models with HTTP {resp.status_code}")
        try:
            return list(resp.json()["data"])
        except (ValueError, KeyError, TypeError):
            raise InferFluxError(f"the server at {self.url} is not an OpenAI-compatible server "
                                 "(/v1/models has no model list)") from None

    def _fit(self, messages: Sequence[Message], max_tokens: int) -> int:
        """Shrink `max_tokens` to the context left after the prompt.

        OpenAI servers refuse (400) a request whose prompt plus `max_tokens` exceeds the context,
        which in a long chat would turn every turn into an error. `/tokenize` with `messages`
        (InferFlux and vLLM) counts the prompt; a server without it gets `max_tokens` unchanged.
        """
        if not self.max_model_len:
            return max_tokens
        try:
            resp = httpx.post(self.url + "/tokenize", json={"model": self.model, "messages": list(messages)},
                              timeout=_STATUS_TIMEOUT)
            count = int(resp.json()["count"]) if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            count = None
        if count is None:
            return max_tokens
        room = self.max_model_len - count
        if room < 1:
            raise InferFluxError(f"the conversation has {count} tokens and fills the model's context of "
                                 f"{self.max_model_len}; /clear starts over")
        return min(max_tokens, room)

    def stream(self, messages: Sequence[Message], temperature: float, max_tokens: int) -> Iterator[str]:
        """Stream one chat completion; closing the stream (cancel, Ctrl-C) makes the server abort it."""
        import openai

        self._cancelled.clear()
        max_tokens = self._fit(messages, max_tokens)
        try:
            stream = self._client.chat.completions.create(
                model=self.model, messages=list(messages), temperature=temperature, max_tokens=max_tokens,
                stream=True)
        except openai.APIConnectionError as exc:
            raise _unreachable(self.url, exc.__cause__ or exc) from None
        except openai.APIStatusError as exc:
            raise InferFluxError(f"the server at {self.url} refused the request (HTTP {exc.status_code}): "
                                 f"{_one_line(_api_message(exc))}") from None
        with self._lock:
            self._stream = stream
        try:
            for chunk in stream:
                if self._cancelled.is_set():  # events already buffered when the stream was closed
                    return
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except Exception as exc:
            if self._cancelled.is_set():  # reading a stream that cancel() closed from another thread
                return
            if isinstance(exc, openai.APIError):  # an error event mid-stream (e.g. the server is draining)
                raise InferFluxError(f"the server at {self.url} ended the answer: "
                                     f"{_one_line(_api_message(exc))}") from None
            if isinstance(exc, httpx.HTTPError):  # the connection dropped mid-answer
                raise InferFluxError(f"lost the connection to the server at {self.url}: {_one_line(exc)}") \
                    from None
            raise
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Close the HTTP stream: the server sees the disconnect and aborts the request. Any thread."""
        self._cancelled.set()
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            # Closing a half-read socket may complain; it is closed either way.
            with contextlib.suppress(Exception):
                stream.close()


def _api_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return str(getattr(exc, "message", None) or exc)


class LocalBackend:
    """Chat with a model loaded in this process (`inferflux.LLM`), no server needed.

    It steps `llm.engine` itself rather than calling `LLM.chat`, because `chat` returns only when
    the whole answer is done, and a terminal chat must show tokens as they are produced and be able
    to stop mid-answer. `config` and `**runtime` (runtime keys, e.g. `max_model_len=256`) are passed
    to `LLM(path, config, **runtime)`, so the CLI can honour `--config` / `--set` as `serve` does.
    """

    def __init__(self, model_path: str, config: Config | None = None, **runtime: Any) -> None:
        # JAX starts here, not when the CLI module is imported.
        from inferflux import LLM

        self.llm = LLM(model_path, config, **runtime)
        self.name = Path(model_path).name
        self._request_id: str | None = None
        self._owner: int | None = None  # the thread that steps the engine; only it may touch the engine
        self._cancelled = threading.Event()

    def stream(self, messages: Sequence[Message], temperature: float, max_tokens: int) -> Iterator[str]:
        """Render, encode, queue one request and step the engine until it finishes, yielding text deltas."""
        from inferflux.engine.request import Request
        from inferflux.engine.sampling_params import SamplingParams

        llm = self.llm
        prompt = llm.model.chat_template.render(list(messages), add_generation_prompt=True)
        # The template writes BOS as text; encoding must not add a second one (as LLM.chat does).
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        request = Request(ids, SamplingParams(temperature=temperature, max_tokens=max_tokens))
        llm.engine.add_request(request)  # a prompt over the context raises SamplingParamsError here
        self._request_id, self._owner = request.request_id, threading.get_ident()
        self._cancelled.clear()
        try:
            while not self._cancelled.is_set():
                outputs = self._step()
                for out in outputs:
                    if out.request_id != request.request_id:
                        continue
                    if out.new_text:
                        yield out.new_text
                    if out.finished:
                        return
                if not outputs and not llm.engine.has_unfinished:
                    return
        finally:
            self._abort()

    def _step(self) -> list[Any]:
        """One engine step with Ctrl-C held back until it returns.

        A KeyboardInterrupt raised inside `step()` could land between the scheduler's and the page
        allocator's bookkeeping and leave the engine inconsistent for every later turn of the
        session. So SIGINT is deferred to the end of the step (one step is milliseconds, or one
        compilation) and re-raised where aborting the request is safe.
        """
        engine = self.llm.engine
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return engine.step()
        pending: list[int] = []
        signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
        try:
            outputs = engine.step()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if pending:
            raise KeyboardInterrupt
        return outputs

    def _abort(self) -> None:
        request_id, self._request_id = self._request_id, None
        if request_id is not None:
            self.llm.engine.abort(request_id)  # frees its KV pages; a no-op for a finished request

    def cancel(self) -> None:
        """Abort the answer in flight. From another thread it only flags the stream, which aborts
        between two steps: the engine is single-threaded and must only be touched by its stepper."""
        self._cancelled.set()
        if self._owner == threading.get_ident():
            self._abort()


def backend_for(target: str, model: str | None = None, config: Config | None = None,
                **runtime: Any) -> ChatBackend:
    """The backend a CLI argument names: an `http(s)://` URL is a server, anything else a model path.

    Settings that cannot apply are refused rather than ignored, so a user who passes them learns why
    they have no effect.
    """
    if target.startswith(("http://", "https://")):
        if runtime or config is not None:
            raise ValueError(f"runtime settings apply to a local model, not to the server at {target}")
        return ServerBackend(target, model)
    if model is not None:
        raise ValueError("--model picks a model on a server; for a local file, give its path instead")
    return LocalBackend(target, config, **runtime)


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
        with open(file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records)
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


# --- status ---


def _scrape(client: httpx.Client, url: str) -> dict[str, float] | None:
    """/metrics as {sample name: value summed over labels}; None if the server has no metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = client.get(url + "/metrics")
    if resp.status_code != 200:
        return None
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    except ValueError as exc:
        raise InferFluxError(f"{url}/metrics is not Prometheus text: {_one_line(exc)}") from None
    return values


def collect_status(url: str, window: float = 1.0) -> dict[str, Any]:
    """Everything `status` shows, as a dict (the `--json` object).

    Counters only say "so far", so the generation rate is measured: `/metrics` is scraped twice,
    `window` seconds apart, and tokens/s is the `inferflux:generation_tokens_total` delta over
    that time: an instantaneous rate, not a one-minute average (which would need a Prometheus
    server). `window <= 0` scrapes once and reports no rate. Prefix-cache hit rate is cumulative
    since the server started: full prompt pages found in the cache / pages looked up.
    """
    url = base_url(url)
    try:
        with httpx.Client(timeout=_STATUS_TIMEOUT) as client:
            health = client.get(url + "/healthz")
            ready = client.get(url + "/readyz")
            models_resp = client.get(url + "/v1/models")
            first, t0 = _scrape(client, url), time.monotonic()
            second, elapsed = None, 0.0
            if first is not None and window > 0:
                time.sleep(window)
                second = _scrape(client, url)
                elapsed = time.monotonic() - t0
    except httpx.HTTPError as exc:
        raise _unreachable(url, exc) from None

    def status_word(resp: httpx.Response, good: str) -> str:
        try:
            word = str(resp.json().get("status", ""))
        except (ValueError, AttributeError):
            word = ""
        if resp.status_code == 200:
            return word or good
        return word or f"HTTP {resp.status_code}"

    models: list[dict[str, Any]] = []
    if models_resp.status_code == 200:
        try:
            models = [{"id": m["id"], "max_model_len": m.get("max_model_len")} for m in models_resp.json()["data"]]
        except (ValueError, KeyError, TypeError):
            models = []
    metrics = second if second is not None else first
    result: dict[str, Any] = {
        "url": url,
        "health": status_word(health, "ok"),
        "healthy": health.status_code == 200,
        "readiness": status_word(ready, "ready"),
        "ready": ready.status_code == 200,
        "models": models,
        "requests_running": None, "requests_waiting": None, "kv_cache_usage_perc": None,
        "prompt_tokens_total": None, "generation_tokens_total": None,
        "generation_tokens_per_s": None, "window_s": None,
        "prefix_cache_hit_rate": None, "prefix_cache_hits_total": None, "prefix_cache_queries_total": None,
        "preemptions_total": None,
    }
    if metrics is None:
        return result

    def get(name: str) -> float | None:
        return metrics.get(name)

    def as_int(value: float | None) -> int | None:
        return None if value is None else int(value)

    kv = get("inferflux:kv_cache_usage_perc")
    hits, queries = get("inferflux:prefix_cache_hits_total"), get("inferflux:prefix_cache_queries_total")
    result.update(
        requests_running=as_int(get("inferflux:num_requests_running")),
        requests_waiting=as_int(get("inferflux:num_requests_waiting")),
        kv_cache_usage_perc=None if kv is None else round(kv * 100, 2),
        prompt_tokens_total=as_int(get("inferflux:prompt_tokens_total")),
        generation_tokens_total=as_int(get("inferflux:generation_tokens_total")),
        prefix_cache_hits_total=as_int(hits), prefix_cache_queries_total=as_int(queries),
        prefix_cache_hit_rate=round(hits / queries, 4) if hits is not None and queries else None,
        preemptions_total=as_int(get("inferflux:num_preemptions_total")),
    )
    before = first.get("inferflux:generation_tokens_total") if first else None
    after = second.get("inferflux:generation_tokens_total") if second else None
    if before is not None and after is not None and elapsed > 0:
        result["generation_tokens_per_s"] = round(max(0.0, after - before) / elapsed, 2)
        result["window_s"] = round(elapsed, 3)
    return result


def status(url: str, as_json: bool = False, window: float = 1.0) -> None:
    """Print a server's health, readiness, models, load, KV-cache use and throughput.

    A quick look without Grafana: the same numbers `/metrics` exports, read and summed for a human
    (or, with `as_json`, one JSON object for scripts). See `collect_status` for how tokens/s is
    measured over `window` seconds.
    """
    info = collect_status(url, float(window))
    if as_json:
        print(json.dumps(info, ensure_ascii=False))
        return

    def num(value: float | None, fmt: str = ",") -> str:
        return "n/a" if value is None else format(value, fmt)

    models = ", ".join(f"{m['id']} (context {m['max_model_len']})" if m.get("max_model_len") else str(m["id"])
                       for m in info["models"]) or "none"
    rate = info["generation_tokens_per_s"]
    generated = num(info["generation_tokens_total"])
    if rate is not None:
        generated += f" total, {rate:,.1f} tokens/s over the last {info['window_s']:.1f} s"
    hit_rate = info["prefix_cache_hit_rate"]
    prefix = "n/a" if hit_rate is None else (
        f"{hit_rate * 100:.1f}% hit rate ({info['prefix_cache_hits_total']:,} of "
        f"{info['prefix_cache_queries_total']:,} prompt-page lookups)")
    kv = info["kv_cache_usage_perc"]
    rows = [
        ("server", info["url"]),
        ("health", info["health"]),
        ("readiness", info["readiness"]),
        ("models", models),
        ("requests", f"{num(info['requests_running'])} running, {num(info['requests_waiting'])} waiting"),
        ("KV cache", "n/a" if kv is None else f"{kv:.1f}% used"),
        ("generated tokens", generated),
        ("prefix cache", prefix),
        ("preemptions", num(info["preemptions_total"])),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
