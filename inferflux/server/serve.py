"""Running the server: load the model, start Hypercorn, and drain cleanly on SIGTERM/SIGINT.

Shutdown order: `/readyz` turns 503 and new requests get 503 at once; running
requests get `server.drain_seconds` to finish; whatever is still running then
is aborted (streams end with an error chunk); Hypercorn stops; exit status 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from inferflux.config import Config
from inferflux.server.app import create_app
from inferflux.server.state import ServerState, load_handle

log = logging.getLogger(__name__)


def serve(model: str, config: Config, config_path: str | None = None) -> int:
    """Serve `model` until SIGTERM/SIGINT; returns the process exit status."""
    # No reference to the handle here: the pool alone holds it, so unloading it frees its memory.
    state = ServerState(config, load_handle(config, model), config_path)
    app = create_app(state)
    hconfig = HypercornConfig()
    hconfig.bind = [f"{config.server.host}:{config.server.port}"]
    if config.server.ollama_port:
        hconfig.bind.append(f"{config.server.host}:{config.server.ollama_port}")
    hconfig.graceful_timeout = 5.0
    hconfig.accesslog = None
    asyncio.run(_run(app, hconfig, state))
    return 0


async def _run(app, hconfig: HypercornConfig, state: ServerState) -> None:
    stop = asyncio.Event()
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving %s on %s", state.default_name, hconfig.bind[0])
    addresses = " and ".join(f"http://{b}" for b in hconfig.bind)
    print(f"InferFlux serving {state.default_name!r} on {addresses}", flush=True)

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
