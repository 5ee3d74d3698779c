"""LM Studio's SDK protocol (`lmstudio` for Python, `@lmstudio/sdk`): websockets per namespace, on the same port.

`lms.Client("127.0.0.1:8080")` (or LM Studio's own `localhost:1234` with `--lmstudio-port 1234`) probes
`GET /lmstudio-greeting`, then opens `ws://host/llm`, `/embedding` and `/system` as it needs them. A thin
translation like every dialect: `framing.py` speaks the wire protocol (handshake, rpc calls,
channels, errors in LM Studio's serialized-error shape); `models.py` (get-or-load, list loaded,
model info, tokenize, unload), `llm.py` (predict: `respond()`/`complete()`, `applyPromptTemplate`),
`embedding.py` (`embedString`) and `system.py` (`listDownloadedModels`) map calls onto the model
pool, the one generation path and the one embedding path.

Not served (the call gets the SDK's error naming the endpoint): tool use (`.act()`, tool parts in a
history), files and images (`/files`), the model repository and downloads (`/repository`), plugins,
diagnostics, `loadModel` (a second instance of a model), speculative decoding and presets.
"""

from __future__ import annotations

from quart import Blueprint

from inferflux.server.errors import APIError

bp = Blueprint("lmstudio_sdk", __name__)
ERROR_SHAPE = APIError.body  # the one HTTP route is the probe; websocket errors are in-protocol

from inferflux.server.lmstudio_sdk import routes  # noqa: E402, F401 - register routes
