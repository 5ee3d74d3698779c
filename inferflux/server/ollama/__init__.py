"""Ollama's REST API (docs/api.md) on the same app, so `ollama` clients and tools work unchanged.

Routes: `/`, `/api/version`, `/api/generate`, `/api/chat` (`generate.py`), `/api/tags`, `/api/ps`,
`/api/show` (`models.py`), `/api/embed` and the legacy `/api/embeddings` (`embed.py`), the model
store's `/api/pull`, `/api/copy`, `/api/delete` (`store.py`) and `/api/create` (`create.py`).
Bodies are pydantic models (`bodies.py`); unknown fields are accepted, as Ollama accepts them.
Streams are NDJSON (`stream` defaults to true, as in Ollama); errors are `{"error": "message"}`,
and an error after the stream started is a last `{"error": ...}` line.

Differences from Ollama, by design or not yet done:
- Prompts go through the model's own Jinja chat template (or the Jinja `template` a name was
  created with); Go `template`s, `suffix` (fill-in-the-middle), `images` and `format`
  (structured output) are refused with a 400.
- `options`: num_predict (-1 and -2 mean "until the context is full"), temperature, top_k, top_p,
  min_p, repeat_penalty, presence_penalty, frequency_penalty, seed, stop and num_ctx (capped at the
  server's context) are honoured; the others Ollama knows are accepted and ignored; unknown ones
  are ignored with a warning. Sampling defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9)
  except repeat_penalty, which defaults to 1.0 because ours covers the whole sequence.
- `/api/pull` takes what `inferctl pull` takes (a GGUF file, a safetensors folder, `ollama://`,
  `hf://`); a bare `NAME[:TAG]` is a model this server has (success at once) or the local Ollama
  store's. Nothing is fetched from Ollama's registry.
- `digest` of the model given on the command line (when it is not stored) is sha256 of (path, size,
  mtime), not of the contents; stored models have their store digest.
- Durations come from the engine's monotonic timestamps, each at least 1 ns; `load_duration` is the
  time this request waited for its model to load.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from inferflux import __version__
from inferflux.server.errors import APIError

bp = Blueprint("ollama", __name__)
OLLAMA_VERSION = f"0.6.0-inferflux-{__version__}"


def ERROR_SHAPE(error: APIError) -> dict[str, Any]:  # noqa: N802 - every dialect's error shape has this name
    """Ollama's error body; an unknown model is worded as Ollama words it (clients match on it)."""
    if error.code == "model_not_found" and error.model is not None:
        return {"error": f'model "{error.model}" not found, try pulling it first'}
    return {"error": error.message}


from inferflux.server.ollama import create, embed, generate, models, store  # noqa: E402, F401 - register routes
