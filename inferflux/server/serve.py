"""Running the server: bind, load the model, start Hypercorn, and drain cleanly on SIGTERM/SIGINT.

The listening sockets are bound before anything else (and handed to Hypercorn as `fd://`), so a
port that is taken fails in a second with the address in the message, rather than after the model
has loaded and after the "serving" line claimed the server was up. That line is printed only once
every socket is bound.

Shutdown order: `/readyz` turns 503 and new requests get 503 at once; running
requests get `server.drain_seconds` to finish; whatever is still running then
is aborted (streams end with an error chunk); Hypercorn stops; exit status 0.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import ssl
import time
from pathlib import Path

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from inferflux.config import Config
from inferflux.errors import InferFluxError
from inferflux.server.access import check_exposure
from inferflux.server.access.keys_redis import check_state
from inferflux.server.access.secrets_store import check_secrets
from inferflux.server.app import create_app
from inferflux.server.state import ServerState, load_handle

log = logging.getLogger(__name__)


def serve(model: str, config: Config, config_path: str | None = None) -> int:
    """Serve `model` until SIGTERM/SIGINT; returns the process exit status."""
    check_exposure(config)  # no unauthenticated server on a reachable address (docs/security.md)
    check_tls(config)
    check_secrets(config)  # stored secrets open with the configured master key, or one line now
    check_state(config)  # a Redis state backend answers
    addresses = [(config.server.host, config.server.port)]
    if config.server.ollama_port:
        addresses.append((config.server.host, config.server.ollama_port))
    if config.server.lmstudio_port:
        addresses.append((config.server.host, config.server.lmstudio_port))
    sockets = bind_sockets(addresses)
    try:
        # No reference to the handle here: the pool alone holds it, so unloading it frees its memory.
        state = ServerState(config, load_handle(config, model), config_path)
        default = state.pool.default_handle()
        if config.server.lora_modules and default is not None:  # before the first request: one line if refused
            from inferflux.server.adapter_load import load_startup_adapters

            load_startup_adapters(default, config)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    # The ports actually bound: `--port 0` asks the system for a free one.
    scheme = "https" if config.server.tls_certfile else "http"
    urls = [url_of(host, sock.getsockname()[1], scheme) for (host, _), sock in zip(addresses, sockets)]
    app = create_app(state)
    hconfig = HypercornConfig()
    # Hypercorn owns the sockets from here (it wraps each descriptor in its own socket object).
    hconfig.bind = [f"fd://{sock.detach()}" for sock in sockets]
    hconfig.graceful_timeout = 5.0
    hconfig.accesslog = None
    if config.server.tls_certfile:
        hconfig.certfile, hconfig.keyfile = config.server.tls_certfile, config.server.tls_keyfile
    asyncio.run(_run(app, hconfig, state, urls))
    return 0


def url_of(host: str, port: int, scheme: str = "http") -> str:
    """`http://host:port` as a client would type it (IPv6 literals in brackets; no host = every address)."""
    host = host or "0.0.0.0"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def check_tls(config: Config) -> None:
    """server.tls_certfile/keyfile must be readable PEM files that belong together: one line now, not a
    traceback from Hypercorn's first handshake (the both-or-neither rule is a config cross rule)."""
    cert, key = config.server.tls_certfile, config.server.tls_keyfile
    if not cert:
        return
    for name, value in (("server.tls_certfile", cert), ("server.tls_keyfile", key)):
        try:
            Path(value).expanduser().read_bytes()
        except OSError as exc:
            raise InferFluxError(f"{name} {value}: cannot read it: {_reason(exc)}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(Path(cert).expanduser(), Path(key).expanduser())
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise InferFluxError(f"server.tls_certfile {cert} / server.tls_keyfile {key}: not a PEM certificate and "
                             f"its private key: {_reason(exc)}") from None


def bind_sockets(addresses: list[tuple[str, int]]) -> list[socket.socket]:
    """Bound TCP sockets for `(host, port)` pairs, or an error that names the address that failed.

    SO_REUSEADDR (as Hypercorn sets it) lets a restarted server take its port while old connections
    are in TIME_WAIT; on Linux it never lets two servers listen on one port.
    """
    sockets: list[socket.socket] = []
    try:
        for host, port in addresses:
            sockets.append(_bind(host, port))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind(host: str, port: int) -> socket.socket:
    where = url_of(host, port).removeprefix("http://")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, OverflowError, UnicodeError) as exc:
        raise InferFluxError(f"cannot listen on {where}: {_reason(exc)}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except (OSError, OverflowError) as exc:
        sock.close()
        hint = " (another server is listening there; pick another with --port)" \
            if getattr(exc, "errno", None) == errno.EADDRINUSE else ""
        raise InferFluxError(f"cannot listen on {where}: {_reason(exc)}{hint}") from None
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text[0].lower() + text[1:]


async def _run(app, hconfig: HypercornConfig, state: ServerState, urls: list[str]) -> None:
    stop = asyncio.Event()
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving %s on %s", state.default_name, urls[0])
    print(f"InferFlux serving {state.default_name!r} on {' and '.join(urls)}", flush=True)

    async def drain() -> None:
        await stop.wait()
        state.draining = True
        pool = state.pool
        deadline = time.monotonic() + state.config.server.drain_seconds
        while pool.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Past the deadline: abort the rest; their streams end with an error chunk.
        await pool.shutdown()
        flush_deadline = time.monotonic() + 2.0
        while pool.in_flight > 0 and time.monotonic() < flush_deadline:
            await asyncio.sleep(0.02)
        shutdown.set()

    drainer = asyncio.create_task(drain())
    await hypercorn_serve(app, hconfig, shutdown_trigger=shutdown.wait)
    await drainer
