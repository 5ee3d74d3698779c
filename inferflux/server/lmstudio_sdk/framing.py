"""One SDK websocket session: the handshake, then multiplexed channels and remote calls, until the socket closes.

LM Studio's SDK opens one websocket per namespace (`ws://host/llm`, `/embedding`, `/system`) and speaks
JSON messages on it:

- first the client's `{"authVersion": 1, "clientIdentifier", "clientPasskey"}`, answered
  `{"success": true}` or `{"success": false, "error": {...}}`;
- `{"type": "rpcCall", "endpoint", "callId", "parameter"?}` answered by one
  `{"type": "rpcResult", "callId", "result"?}` or `{"type": "rpcError", "callId", "error"}`;
- `{"type": "channelCreate", "endpoint", "channelId", "creationParameter"?}` opens a channel: the server
  streams `{"type": "channelSend", "channelId", "message"}` and ends it with `channelClose`, or fails it
  with `{"type": "channelError", "channelId", "error"}`; the client may `channelSend` (the SDK sends
  `{"type": "cancel"}`) and `channelClose`.

Errors are LM Studio's serialized error (`{"title", "cause"?, "suggestion"?, "displayData"?}`): the SDK
raises them as `LMStudioServerError` naming the title, and an unknown model's `displayData.code`
`generic.noModelMatchingQuery` as `LMStudioModelNotFoundError`. Each call and channel runs in its own
task, so a long prediction does not hold up a `listLoaded`; a failure in one is that call's error,
never the socket's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from quart import websocket

from inferflux.server.errors import APIError, to_api_error

log = logging.getLogger(__name__)

Json = dict[str, Any]


class Channel:
    """The server's end of one channel: send messages on it; `cancelled` is set when the client cancels."""

    def __init__(self, session: Session, channel_id: int) -> None:
        self.session = session
        self.id = channel_id
        self.cancelled = asyncio.Event()

    async def send(self, message: Json) -> None:
        await self.session.send({"type": "channelSend", "channelId": self.id, "message": message})

    def on_client_message(self, message: Any) -> None:
        if isinstance(message, dict) and message.get("type") == "cancel":
            self.cancelled.set()


Rpc = Callable[[Any], Awaitable[Any]]
ChannelHandler = Callable[[Channel, Any], Awaitable[None]]


def sdk_error(exc: BaseException) -> Json:
    """An exception as LM Studio's serialized error; an unexpected one is logged and named, never a traceback."""
    error = to_api_error(exc)
    if error is None:
        log.exception("LM Studio SDK request failed", exc_info=exc)
        error = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
    return error_payload(error)


def error_payload(error: APIError) -> Json:
    body: Json = {"title": error.message}
    if error.code == "model_not_found" or (error.status == 404 and error.model):
        # What LM Studio sends when no model matches: the SDK raises LMStudioModelNotFoundError for it.
        body["displayData"] = {"code": "generic.noModelMatchingQuery", "query": {"identifier": error.model}}
        body["suggestion"] = "List the models this server has with client.llm.list_loaded() or GET /api/v1/models"
    elif error.status >= 500:
        body["cause"] = "the server could not complete the request"
    return body


class Session:
    """A namespace's websocket: authenticate, then dispatch every message to its endpoint's handler."""

    def __init__(self, namespace: str, rpcs: dict[str, Rpc], channels: dict[str, ChannelHandler],
                 authenticate: Callable[[Json], Awaitable[Json | None]]) -> None:
        self.namespace = namespace
        self.rpcs = rpcs
        self.channel_handlers = channels
        self.authenticate = authenticate  # None when the client may proceed, else the error to answer with
        self._send_lock = asyncio.Lock()
        self._channels: dict[int, Channel] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, message: Json) -> None:
        async with self._send_lock:
            await websocket.send(json.dumps(message, ensure_ascii=False))

    async def run(self) -> None:
        """Serve the socket until the client closes it; running calls and channels are cancelled then."""
        try:
            if not await self._handshake():
                return
            while True:
                raw = await websocket.receive()
                self._dispatch(raw)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handshake(self) -> bool:
        try:
            hello = json.loads(await websocket.receive())
        except (ValueError, TypeError):
            hello = None
        if not isinstance(hello, dict) or "clientIdentifier" not in hello:
            await self.send({"success": False, "error": {
                "title": "expected the LM Studio SDK's authentication message "
                         '({"authVersion": 1, "clientIdentifier", "clientPasskey"}) first'}})
            return False
        refused = await self.authenticate(hello)
        if refused is not None:
            await self.send({"success": False, "error": refused})
            return False
        await self.send({"success": True})
        return True

    def _dispatch(self, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
        except (ValueError, TypeError):
            message = None
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "rpcCall" and isinstance(message.get("callId"), int):
            self._spawn(self._rpc(message))
        elif kind == "channelCreate" and isinstance(message.get("channelId"), int):
            self._open(message)
        elif kind == "channelSend" and message.get("channelId") in self._channels:
            self._channels[message["channelId"]].on_client_message(message.get("message"))
        elif kind == "channelClose" and message.get("channelId") in self._channels:
            self._channels[message["channelId"]].cancelled.set()
        elif kind not in ("channelSend", "channelClose", "keepAlive"):
            self._spawn(self.send({"type": "communicationWarning",
                                   "warning": f"unexpected message on /{self.namespace}: {str(raw)[:200]}"}))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rpc(self, message: Json) -> None:
        call_id, endpoint = message["callId"], message.get("endpoint")
        handler = self.rpcs.get(endpoint) if isinstance(endpoint, str) else None
        try:
            if handler is None:
                raise APIError(400, f"the endpoint {self.namespace}.{endpoint} is not served by this server "
                               f"(served: {', '.join(sorted(self.rpcs)) or 'none'})", code="not_implemented")
            result = await handler(message.get("parameter"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - answered as the call's error
            await self.send({"type": "rpcError", "callId": call_id, "error": sdk_error(exc)})
            return
        reply: Json = {"type": "rpcResult", "callId": call_id}
        if result is not None:
            reply["result"] = result
        await self.send(reply)

    def _open(self, message: Json) -> None:
        channel = Channel(self, message["channelId"])
        self._channels[channel.id] = channel
        endpoint = message.get("endpoint")
        handler = self.channel_handlers.get(endpoint) if isinstance(endpoint, str) else None

        async def serve() -> None:
            try:
                if handler is None:
                    raise APIError(400, f"the channel {self.namespace}.{endpoint} is not served by this server "
                                   f"(served: {', '.join(sorted(self.channel_handlers)) or 'none'})",
                                   code="not_implemented")
                await handler(channel, message.get("creationParameter"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - answered as the channel's error
                await self.send({"type": "channelError", "channelId": channel.id, "error": sdk_error(exc)})
            else:
                await self.send({"type": "channelClose", "channelId": channel.id})
            finally:
                self._channels.pop(channel.id, None)

        self._spawn(serve())
