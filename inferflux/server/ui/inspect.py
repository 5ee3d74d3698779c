"""Read-only views of an engine's scheduler and KV cache for /debug, taken on the engine thread.

`Engine.inspect(kv_view)` runs `kv_view(core)` between two steps, so the page map and the queues are
one consistent moment, with no lock on the step path and nothing mutated.
"""

from __future__ import annotations

from typing import Any


def kv_view(core: Any) -> dict[str, Any]:
    """Every page's state and every queued sequence with its pages and token counts (engine thread)."""
    allocator = core.allocator
    states = allocator.page_states()
    sequences = []
    for queue, seq in core.scheduler.snapshot():
        live = core._by_seq.get(seq.seq_id)
        request_id = live.request.request_id if live is not None else None
        cached = sum(1 for page in seq.pages if states[page] == "prefix")
        sequences.append({"engine_request_id": request_id, "sample": seq.index, "state": queue,
                          "kind": "embed" if seq.is_embedding else "generate",
                          "prompt_tokens": len(seq.prompt_ids), "output_tokens": len(seq.output_ids),
                          "computed_tokens": seq.num_computed, "cached_tokens": seq.num_cached_tokens,
                          "max_tokens": seq.params.max_tokens, "pages": list(seq.pages), "prefix_pages": cached})
    counts = {state: states.count(state) for state in ("free", "used", "prefix", "cached")}
    return {"page_size": allocator.page_size, "num_pages": allocator.num_pages, "pages": states,
            "counts": counts, "sequences": sequences,
            "prefix_cache": {"queries": allocator.stats.queries, "hits": allocator.stats.hits}}
