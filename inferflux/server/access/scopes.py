"""The one table of what each route needs: a scope, or nothing (public).

Keyed by the Quart endpoint name (`blueprint.function`), so a route names its scope once and a
renamed or added route that is not listed here is *denied* when `security.auth` is `required`
(fail closed); `tests/test_access.py` asserts every registered route is listed.

Scopes (a key holds any set of them):
- `inference`: generating routes of every dialect (chat, completions, generate, WebSocket chat),
  and the tokenizer routes (`/tokenize`, `/detokenize`, `/tokenizer_info`): they load the model and
  run it, the same resource as inference, and inference clients call them to budget prompts.
- `embeddings`: embedding routes of every dialect, and rerank / score (`/v1/rerank`, `/v2/rerank`, `/v1/score`).
- `models:read`: listing and describing models (`/v1/models`, `/api/tags`, `/api/ps`, `/api/show`,
  `/api/v0/models`), the version routes and `/metrics` (read-only views of the server; none of
  them loads a model).
- `models:write`: changing the model store or what is loaded (pull, copy, delete, create).
- `admin`: everything under `/admin` (reload, tenants, keys) and the data of `/debug` (`/debug/api/*`:
  KV pages, queues, other tenants' token traces).

Public: `/healthz`, `/readyz` (probes carry no credentials), `/openapi.json` (the contract, no
data), Ollama's `/` ("Ollama is running", the probe its clients use), and the static pages
`/debug`, `/admin` and their `/ui/*` files (a browser cannot send a key when it navigates; the pages
hold no data and call the JSON routes with the key pasted into them). `/metrics` is public only
with `security.public_metrics: true`.
"""

from __future__ import annotations

from typing import Final

INFERENCE: Final = "inference"
EMBEDDINGS: Final = "embeddings"
MODELS_READ: Final = "models:read"
MODELS_WRITE: Final = "models:write"
ADMIN: Final = "admin"
SCOPES: Final = (INFERENCE, EMBEDDINGS, MODELS_READ, MODELS_WRITE, ADMIN)

PUBLIC: Final = ""  # no key needed
METRICS: Final = "metrics"  # models:read, or public with security.public_metrics

ROUTE_SCOPES: Final[dict[str, str]] = {
    # operations
    "ops.healthz": PUBLIC, "ops.readyz": PUBLIC, "ops.openapi": PUBLIC, "ops.metrics": METRICS,
    # OpenAI (and vLLM's extras)
    "openai.chat_completions": INFERENCE, "openai.chat_websocket": INFERENCE, "openai.completions": INFERENCE,
    "openai.tokenize": INFERENCE, "openai.detokenize": INFERENCE, "openai.tokenizer_info": INFERENCE,
    "openai.embeddings": EMBEDDINGS,
    # rerank and score (cross-encoders): embedding-class work, reading text and returning numbers
    "rerank.rerank": EMBEDDINGS, "rerank.rerank_bare": EMBEDDINGS, "rerank.rerank_v2": EMBEDDINGS,
    "rerank.score": EMBEDDINGS,
    "openai.list_models": MODELS_READ, "openai.get_model": MODELS_READ, "openai.version": MODELS_READ,
    "openai.load_lora_adapter": MODELS_WRITE, "openai.unload_lora_adapter": MODELS_WRITE,  # vLLM's LoRA routes
    # Ollama
    "ollama.root": PUBLIC,
    "ollama.api_generate": INFERENCE, "ollama.api_chat": INFERENCE,
    "ollama.api_embed": EMBEDDINGS, "ollama.api_embeddings": EMBEDDINGS,
    "ollama.api_version": MODELS_READ, "ollama.api_tags": MODELS_READ, "ollama.api_ps": MODELS_READ,
    "ollama.api_show": MODELS_READ,
    "ollama.api_pull": MODELS_WRITE, "ollama.api_copy": MODELS_WRITE, "ollama.api_delete": MODELS_WRITE,
    "ollama.api_create": MODELS_WRITE,
    # OpenAI Responses (stored responses are the tenant's own conversations: the same scope as making them)
    "responses.create_response": INFERENCE, "responses.get_response": INFERENCE,
    "responses.delete_response": INFERENCE, "responses.list_input_items": INFERENCE,
    "responses.count_input_tokens": INFERENCE,
    # Anthropic Messages
    "anthropic.create_message": INFERENCE, "anthropic.count_tokens": INFERENCE,
    # LM Studio
    "lmstudio.chat_completions": INFERENCE, "lmstudio.completions": INFERENCE,
    "lmstudio.embeddings": EMBEDDINGS,
    "lmstudio.list_models": MODELS_READ, "lmstudio.get_model": MODELS_READ,
    # LM Studio REST v1 (loading and unloading change what is loaded: models:write)
    "lmstudio_v1.chat": INFERENCE, "lmstudio_v1.list_models": MODELS_READ,
    "lmstudio_v1.load_model": MODELS_WRITE, "lmstudio_v1.unload_model": MODELS_WRITE,
    # LM Studio's SDK: its probe, and one websocket per namespace (the key may be the handshake's clientPasskey)
    "lmstudio_sdk.greeting": PUBLIC, "lmstudio_sdk.llm": INFERENCE, "lmstudio_sdk.embedding": EMBEDDINGS,
    "lmstudio_sdk.system": MODELS_READ, "lmstudio_sdk.unserved": PUBLIC,  # unserved: every call is an error
    # /admin
    "admin.reload": ADMIN,
    "access.list_tenants": ADMIN, "access.create_tenant": ADMIN, "access.delete_tenant": ADMIN,
    "access.list_keys": ADMIN, "access.create_key": ADMIN, "access.revoke_key": ADMIN,
    "access.list_audit": ADMIN, "access.verify_audit": ADMIN,
    "access.list_policies": ADMIN, "access.get_policy": ADMIN, "access.set_policy": ADMIN,
    "access.rollback_policy": ADMIN,
    "access.list_limits": ADMIN, "access.get_limits": ADMIN, "access.set_limits": ADMIN,
    "access.delete_limits": ADMIN,
    # The local pages (static, no data: their scripts send the admin key) and the /debug data behind them
    "ui.asset": PUBLIC, "adminui.admin_page": PUBLIC, "debug.debug_page": PUBLIC,
    "debug.kv": ADMIN, "debug.requests": ADMIN, "debug.list_traces": ADMIN, "debug.get_trace": ADMIN,
}

# Websocket routes whose protocol carries the key in its first message (LM Studio's SDK sends no headers,
# its handshake has a `clientPasskey`): opened without a key header, they check the key they get, with
# the scope above, before serving anything (server/lmstudio_sdk/routes.py).
IN_BAND: Final = frozenset({"lmstudio_sdk.llm", "lmstudio_sdk.embedding", "lmstudio_sdk.system"})


def required_scope(endpoint: str, public_metrics: bool = False) -> str | None:
    """The scope `endpoint` needs, `PUBLIC` for none, or None when the route is not listed (deny it)."""
    scope = ROUTE_SCOPES.get(endpoint)
    if scope == METRICS:
        return PUBLIC if public_metrics else MODELS_READ
    return scope


def parse_scopes(text: str | list[str]) -> tuple[str, ...]:
    """`"inference,models:read"` (or a list) as known scopes, in the table's order; unknown ones are an error."""
    from inferflux.server.access.errors import KeyStoreError

    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    unknown = [s for s in items if s not in SCOPES]
    if unknown:
        raise KeyStoreError(f"unknown scope {', '.join(unknown)}: scopes are {', '.join(SCOPES)}")
    if not items:
        raise KeyStoreError(f"a key needs at least one scope: {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in items)
