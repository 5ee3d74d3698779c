"""The OPA decision: may this principal run this request? (`policy.opa.*`, docs/security.md).

Two ways to ask, one answer shape:

- `policy.opa.url`: a real OPA server's REST API, `POST <url>/v1/data/<path>` with
  `{"input": {...}}`; its `decision_id` (when OPA's decision logs are on) goes into the audit record.
- `policy.opa.rego_file`: the same Rego evaluated in-process with regorus (the Rust Rego engine of
  microsoft/regorus; on PyPI as `gordon-to-regorus`, since the upstream wheel is not published
  there): no sidecar, microseconds per decision.

The document at `<path>` is either a boolean (allow) or an object `{"allow": bool, "reason": str}`.
`allow: false` or an undefined document denies: 403 `permission_error` with the reason. An OPA that
cannot be reached (or a Rego error) denies too, unless `policy.opa.fail_open`. Decisions are cached
per input for `policy.opa.cache_seconds`: the input holds the policy_version, so a policy change
never serves a stale decision.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from inferflux.config_schema import OpaConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str
    decision_id: str


def _verdict(result: Any, decision_id: str) -> Decision:
    if isinstance(result, bool):
        return Decision(result, "" if result else "the policy denies this request", decision_id)
    if isinstance(result, dict) and isinstance(result.get("allow"), bool):
        reason = result.get("reason")
        return Decision(result["allow"], str(reason) if reason else "the policy denies this request", decision_id)
    return Decision(False, "the policy decision is undefined for this request", decision_id)


class Opa:
    """Asks OPA (remote or in-process) and caches the answers."""

    def __init__(self, config: OpaConfig) -> None:
        self.config = config
        self.path = config.path.strip("/")
        self._cache: dict[str, tuple[float, Decision]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # a regorus Engine is bound to the thread that made it
        self.remote = bool(config.url)
        if config.rego_file and not self.remote:
            self._engine()  # a syntax error fails here (the first request), with the file's line
        self._http: Any = None
        if config.url:
            import httpx

            self._http = httpx.Client(base_url=config.url.rstrip("/"), timeout=config.timeout_ms / 1000)

    def decide(self, request: dict[str, Any]) -> Decision:
        """The decision for `request` (the input document); blocking (a remote call): run it in a thread."""
        key = json.dumps(request, sort_keys=True)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            decision = self._ask(request)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - unreachable OPA, a bad answer, a Rego error (a pyo3 panic)
            log.warning("OPA decision failed (%s): %s", "allowing" if self.config.fail_open else "denying", exc)
            return Decision(self.config.fail_open, f"the policy engine is unavailable ({type(exc).__name__})",
                            "unavailable")
        if self.config.cache_seconds:
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[key] = (now + self.config.cache_seconds, decision)
        return decision

    def _engine(self) -> Any:
        engine = getattr(self._local, "engine", None)
        if engine is None:
            import regorus

            engine = self._local.engine = regorus.Engine()
            engine.add_policy_from_file(self.config.rego_file)
        return engine

    def _ask(self, request: dict[str, Any]) -> Decision:
        if not self.remote:
            engine = self._engine()
            engine.set_input_json(json.dumps(request))
            try:
                result = engine.eval_rule("data." + self.path.replace("/", "."))
            except RuntimeError as exc:
                if "not a valid rule path" not in str(exc):
                    raise
                result = None  # no such rule: undefined
            return _verdict(result, "local-" + uuid.uuid4().hex[:16])
        response = self._http.post(f"/v1/data/{self.path}", json={"input": request})
        response.raise_for_status()
        body = response.json()
        return _verdict(body.get("result"), str(body.get("decision_id") or ""))


__all__ = ["Decision", "Opa"]
