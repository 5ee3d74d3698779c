"""Loading a LoRA adapter into a served model: one path for `POST /v1/load_lora_adapter` and for the adapters
`inferctl serve --lora-modules` (server.lora_modules) loads at start.

The source is a PEFT folder or GGUF LoRA file on the server, or a stored adapter's name (store/adapters.py:
decrypted in memory when stored encrypted). With `security.require_signed_models` the adapter must be signed by
a trusted key, exactly as models must. Reading, verifying and decrypting run on a worker thread; only the slot
write runs on the engine thread, between two steps (engine/lora.py), so a load never stalls decoding for I/O.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from inferflux.engine.lora import LoraError
from inferflux.errors import InferFluxError
from inferflux.server.errors import APIError, bad_request
from inferflux.store.adapters import open_adapter
from inferflux.store.signing import SignatureError

if TYPE_CHECKING:
    from inferflux.server.handle import ModelHandle


def parse_modules(text: str) -> list[tuple[str, str]]:
    """`server.lora_modules`: comma-separated `NAME=SOURCE` (a bare `NAME` is the stored adapter of that name)."""
    modules = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            name, _, source = item.partition("=")
            modules.append((name.strip(), source.strip() or name.strip()))
    return modules


async def load_adapter(handle: ModelHandle, name: str, source: str, config: Any) -> None:
    """Load `source` into `handle`'s engine as `name`; a refusal is an `APIError` (4xx) with one line."""
    if handle.engine is None:
        raise bad_request(f"the model `{handle.name}` is an embedding model; it takes no adapters", param="lora_name")
    loras = handle.engine.core.loras

    def read() -> Any:
        return loras.read(open_adapter(source, config))

    try:
        loras.check(name)  # LoRA off, a taken name, no free slot: before reading anything
        adapter = await asyncio.to_thread(read)  # files, signatures, decryption: off the engine thread
        # Written on the engine thread between two steps (one `.at[slot].set` per array: milliseconds).
        await handle.engine.inspect(lambda core: core.loras.load(name, adapter))
    except SignatureError as exc:
        raise APIError(403, f"adapter refused: {exc}", type="permission_error", param="lora_path",
                       code="unsigned_adapter") from None
    except LoraError as exc:
        raise bad_request(str(exc), param="lora_path") from None
    except InferFluxError as exc:  # not found, a store error, an encrypted adapter without its master key
        raise bad_request(str(exc), param="lora_path") from None


def load_startup_adapters(handle: ModelHandle, config: Any) -> list[str]:
    """Load `server.lora_modules` into the default model before the server answers; an error stops the start
    with one line (an `InferFluxError`, as a bad model does)."""
    loaded = []
    for name, source in parse_modules(config.server.lora_modules):
        try:
            asyncio.run(load_adapter(handle, name, source, config))
        except APIError as exc:
            raise AdapterStartError(f"server.lora_modules {name}={source}: {exc.message}") from None
        loaded.append(name)
    return loaded


async def refresh_lora_info(state: Any) -> None:
    """Before a /metrics scrape: `vllm:lora_requests_info` from the default engine's scheduler (read on its
    thread between two steps, waiting 1 s at most). Absent when LoRA is off (max_loras 0), as in vLLM."""
    handle = state.pool.default_handle()
    engine = getattr(handle, "engine", None)
    loras = getattr(getattr(engine, "core", None), "loras", None)
    if engine is None or loras is None or not loras.runner.max_loras:
        return
    try:  # a step that compiles can take long: a scrape must not wait for it; the last values stay
        running, waiting = await engine.inspect(
            lambda core: core.loras.request_info(core.scheduler.running, core.scheduler.waiting), timeout=1.0)
    except TimeoutError:
        return
    state.metrics.set_lora_info(running, waiting, loras.runner.max_loras)


class AdapterStartError(InferFluxError):
    """An adapter named in server.lora_modules cannot be loaded."""
