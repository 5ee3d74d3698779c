"""How fast a policy change reaches every replica: N servers on one Redis, updates through the first.

    python benchmarks/policy_propagation.py [--replicas 2] [--updates 100] [--model PATH] [--redis URL]

Each update sets tenant `bench`'s document to block one new term (`PUT /admin/policies` on server 0). The
local apply time is that PUT's round trip (store write plus the server's own reload). The propagation time
is from sending the PUT until each other replica refuses a prompt holding the new term (400
`content_policy_violation`), polled back to back; the replicas apply the change when its Redis pub/sub
message arrives (server/policy/watch.py), so a probe can run before that, and every probe prompt is sent
once beforehand so such a probe never includes a compile. Reports P50/P99 of both, against the seed's bars (2 s
across replicas, 250 ms locally). Without --model a tiny random Llama is built (the tests' fixture); without
--redis a private redis-server is started (tests/fixtures/redis_server.py). Run from a source checkout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tiny_model() -> Path:
    from tests.fixtures import tokenizers
    from tests.fixtures.models import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-policy-"))
    tok = tokenizers.make_llama3_bpe_tokenizer(root / "tok")
    return make_tiny_model("llama", root / "model", tok)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--redis")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from inferflux.server.access.keys_redis import RedisKeyStore
    from tests.fixtures.redis_server import fresh_db, redis_server
    from tests.fixtures.server import Server

    model = args.model or _tiny_model()
    with contextlib.ExitStack() as stack:
        base = args.redis or stack.enter_context(redis_server())
        url = fresh_db(base.rstrip("/"))
        store = RedisKeyStore(url)
        store.create_tenant("bench")
        key, _ = store.create_key("bench", "admin,inference")
        shared = ["security.auth=required", "state.backend=redis", f"state.redis_url={url}"]
        with concurrent.futures.ThreadPoolExecutor(args.replicas) as pool:
            servers = list(pool.map(lambda _: Server(model, "tiny", extra=shared), range(args.replicas)))
        for server in servers:
            stack.callback(server.stop)
        headers = {"Authorization": f"Bearer {key}"}
        clients = [stack.enter_context(httpx.Client(base_url=s.url, headers=headers, timeout=60)) for s in servers]
        body = {"model": "tiny", "max_tokens": 1}
        terms = [f"zq{i}x" for i in range(args.updates)]
        for c in clients:  # warm: a probe that runs before the change lands must not pay for a compile
            for term in ["warm", *terms]:  # (each new prompt length is a new prefill shape: seconds on CPU)
                c.post("/v1/completions", json={**body, "prompt": term}).raise_for_status()
        local, spread = [], []
        for term in terms:
            start = time.perf_counter()
            answer = clients[0].put("/admin/policies", json={"scope": "bench", "document": {"blocked_terms": [term]}})
            local.append(time.perf_counter() - start)
            answer.raise_for_status()
            for c in clients[1:]:
                while c.post("/v1/completions", json={**body, "prompt": term}).status_code != 400:
                    pass
                spread.append(time.perf_counter() - start)
        result = {"replicas": args.replicas, "updates": args.updates,
                  "local_apply_ms": {"p50": statistics.median(local) * 1000, "p99": _pct(local, 0.99) * 1000},
                  "propagation_ms": {"p50": statistics.median(spread) * 1000, "p90": _pct(spread, 0.9) * 1000,
                                     "p99": _pct(spread, 0.99) * 1000, "max": max(spread) * 1000}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.replicas} replicas, {args.updates} updates through replica 0")
    print(f"local apply (PUT round trip): P50 {result['local_apply_ms']['p50']:.1f} ms, "
          f"P99 {result['local_apply_ms']['p99']:.1f} ms (bar: 250 ms)")
    print(f"enforced on the other replicas: P50 {result['propagation_ms']['p50']:.1f} ms, "
          f"P90 {result['propagation_ms']['p90']:.1f} ms, P99 {result['propagation_ms']['p99']:.1f} ms, "
          f"max {result['propagation_ms']['max']:.1f} ms (bar: 2000 ms)")
    slowest = sorted(range(len(spread)), key=lambda i: -spread[i])[:3]
    print("slowest updates: " + ", ".join(f"#{i // max(1, args.replicas - 1)} {spread[i] * 1000:.0f} ms"
                                          for i in slowest))


if __name__ == "__main__":
    main()
