"""The two ways `inferctl run` / `chat` talk to a model: a server over HTTP, or the engine in this process.

Both speak the same small protocol (`ChatBackend`): `ServerBackend` streams from any
OpenAI-compatible server over HTTP, `LocalBackend` loads the model in this process and steps the
engine itself. The REPL (`chat_cmds.run`) does not know which one it talks to; that is what lets
the same chat serve "try this file" and "poke the running server".

Nothing here imports JAX at module level: a `ServerBackend` chat must start instantly.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import httpx

from inferflux.errors import InferFluxError

if TYPE_CHECKING:
    from inferflux.config import Config
    from inferflux.engine.request import StreamOutput

Message = Mapping[str, str]

# Connecting must fail fast (a wrong port should not hang the terminal); reading must not time out,
# because a CPU server can take minutes before the first token of a long prompt, and Ctrl-C cancels.
_TIMEOUT = httpx.Timeout(None, connect=5.0)
_STATUS_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def _one_line(value: object) -> str:
    """Errors reach the user as one line (`inferctl: error: ...`); library messages may hold newlines."""
    return " ".join(str(value).split())


def api_headers() -> dict[str, str]:
    """`Authorization: Bearer $INFERFLUX_API_KEY` when it is set: what a server with security.auth=required needs."""
    key = os.environ.get("INFERFLUX_API_KEY", "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


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

    The model defaults to the first one `/v1/models` lists, so `inferctl run --url http://host:8080`
    needs no model name. Asking `/v1/models` at construction also checks the server is there
    before the REPL shows its first prompt.

    It speaks the streaming chat API with `httpx` (a dependency of the base install) rather than
    the `openai` package: one POST and a Server-Sent-Events reader are all a terminal chat needs,
    and `pip install -e .` then has everything the documented `run --url` / `chat --url` use.
    """

    def __init__(self, url: str, model: str | None = None) -> None:
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
        self._client = httpx.Client(timeout=_TIMEOUT, headers=api_headers())
        self._response: httpx.Response | None = None
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    def _models(self) -> list[dict[str, Any]]:
        try:
            resp = httpx.get(self.url + "/v1/models", timeout=_STATUS_TIMEOUT, headers=api_headers())
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
                              timeout=_STATUS_TIMEOUT, headers=api_headers())
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
        self._cancelled.clear()
        max_tokens = self._fit(messages, max_tokens)
        body = {"model": self.model, "messages": list(messages), "temperature": temperature,
                "max_tokens": max_tokens, "stream": True}
        try:
            request = self._client.build_request("POST", self.url + "/v1/chat/completions", json=body)
            response = self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from None
        with self._lock:
            self._response = response
        try:
            if response.status_code != 200:
                response.read()
                raise InferFluxError(f"the server at {self.url} refused the request (HTTP {response.status_code}):"
                                     f" {_one_line(_error_message(response.text))}")
            for data in _sse_data(response):
                if self._cancelled.is_set():  # events already buffered when the stream was closed
                    return
                if data == "[DONE]":
                    return
                text = _delta_text(data, self.url)
                if text:
                    yield text
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if self._cancelled.is_set():  # reading a stream that cancel() closed from another thread
                return
            raise InferFluxError(f"lost the connection to the server at {self.url}: {_one_line(exc)}") from None
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Close the HTTP stream: the server sees the disconnect and aborts the request. Any thread."""
        self._cancelled.set()
        with self._lock:
            response, self._response = self._response, None
        if response is not None:
            # Closing a half-read socket may complain; it is closed either way.
            with contextlib.suppress(Exception):
                response.close()


def _sse_data(response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a Server-Sent-Events body, one per event (multi-line data joined)."""
    lines: list[str] = []
    for line in response.iter_lines():
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
    if lines:
        yield "\n".join(lines)


def _delta_text(data: str, url: str) -> str:
    """The text of one chat-completion chunk; an error event (a draining server, say) is raised."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise InferFluxError(f"the server at {url} sent a stream event that is not JSON: {data[:80]!r}") from None
    if not isinstance(chunk, dict):
        return ""
    if chunk.get("error"):
        raise InferFluxError(f"the server at {url} ended the answer: {_one_line(_error_message(chunk))}")
    choices = chunk.get("choices") or []
    delta = choices[0].get("delta") if choices and isinstance(choices[0], dict) else None
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def _error_message(body: Any) -> str:
    """The message of an OpenAI error body (`{"error": {"message": ...}}`), or the body as it came."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body.strip()[:300] or "no message"
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
        if body.get("message"):
            return str(body["message"])
    return str(body)[:300]


class LocalBackend:
    """Chat with a model loaded in this process (`inferflux.LLM`), no server needed.

    It iterates `LLM.stream` rather than calling `LLM.chat`, because `chat` returns only when the
    whole answer is done, and a terminal chat must show tokens as they are produced and be able to
    stop mid-answer (`LLM` holds Ctrl-C back until a step is done, so stopping never leaves the
    engine half-updated). `config` and `**runtime` (runtime keys, e.g. `max_model_len=256`) are
    passed to `LLM(path, config, **runtime)`, so the CLI can honour `--config` / `--set` as `serve`
    does. `name` is what the banner and transcripts call the model (default: the file or folder name).
    """

    def __init__(self, model_path: str, config: Config | None = None, name: str | None = None,
                 **runtime: Any) -> None:
        # JAX starts here, not when the CLI module is imported.
        from inferflux import LLM

        self.llm = LLM(model_path, config, **runtime)
        # What the banner and the transcript call it: the store name the user typed, not the blob's hash.
        self.name = name or Path(model_path).name
        self._outputs: Generator[StreamOutput, None, None] | None = None
        self._owner: int | None = None  # the thread that steps the engine; only it may touch the engine
        self._cancelled = threading.Event()

    def stream(self, messages: Sequence[Message], temperature: float, max_tokens: int) -> Iterator[str]:
        """Render, encode and stream one request through `LLM.stream`, yielding text deltas."""
        from inferflux.engine.sampling_params import SamplingParams

        llm = self.llm
        prompt = llm.model.chat_template.render(list(messages), add_generation_prompt=True)
        # The template writes BOS as text; encoding must not add a second one (as LLM.chat does).
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        # A prompt over the context raises SamplingParamsError here.
        outputs = llm.stream(ids, SamplingParams(temperature=temperature, max_tokens=max_tokens))
        self._outputs, self._owner = outputs, threading.get_ident()
        self._cancelled.clear()
        try:
            for out in outputs:
                if out.new_text:
                    yield out.new_text
                if self._cancelled.is_set():
                    return
        finally:
            self._abort()

    def _abort(self) -> None:
        outputs, self._outputs = self._outputs, None
        if outputs is not None:
            outputs.close()  # LLM.stream aborts the request and frees its KV pages; a no-op once finished

    def cancel(self) -> None:
        """Abort the answer in flight. From another thread it only flags the stream, which aborts
        between two steps: the engine is single-threaded and must only be touched by its stepper."""
        self._cancelled.set()
        if self._owner == threading.get_ident():
            self._abort()


def backend_for(target: str, model: str | None = None, config: Config | None = None, name: str | None = None,
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
    return LocalBackend(target, config, name, **runtime)
