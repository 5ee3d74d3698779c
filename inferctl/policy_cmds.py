"""`inferctl admin policy list|show|set|rollback`: the versioned policy documents, local or on a server.

Without `--url` the commands open the store `state.backend` names (`$INFERFLUX_HOME/state.db`, or
the Redis at `state.redis_url`), which a running server checks at each request (one read of the
policy_version); with `--url` (or INFERFLUX_URL) they call `/admin/policies` with an admin key.
"""

from __future__ import annotations

import getpass
import json as jsonlib
import os
from pathlib import Path
from typing import Any

from inferflux.errors import InferFluxError

POLICY_VERBS = ("list", "show", "set", "rollback")


def _local() -> Any:
    from inferflux.config import load_config
    from inferflux.server.policy.store import open_policy_store

    config = load_config()
    return open_policy_store(config.state.backend, config.state.redis_url, config.home_path)


def _remote(method: str, path: str, url: str, api_key: str | None, body: Any = None) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0) as http:
        response = http.request(method, path, json=body)
    data = response.json() if response.content else {}
    if response.status_code >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        raise InferFluxError(f"{url.rstrip('/')}{path}: {response.status_code} {message or response.text}")
    return data


def _read(file: str) -> dict[str, Any]:
    """A policy file: JSON or YAML, `{scope, document}` or a bare document (then --scope names it)."""
    import yaml

    try:
        data = yaml.safe_load(Path(file).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InferFluxError(f"{file}: {exc}") from None
    if not isinstance(data, dict):
        raise InferFluxError(f"{file}: expected a mapping (a policy document)")
    return data


def _url(url: str | None) -> str | None:
    return url or os.environ.get("INFERFLUX_URL")


def _key(api_key: str | None) -> str | None:
    return api_key or os.environ.get("INFERFLUX_API_KEY")


class PolicyAdmin:
    """The `admin policy` verbs (a base of `admin_cmds.Admin`)."""

    def policy_list(self, history: bool = False, url: str | None = None, api_key: str | None = None,
                    json: bool = False) -> None:  # noqa: A002
        """List each scope's current policy version (--history: every version).

        Args:
            history: every version, oldest first, not only the current ones
            url URL: a running server instead of the local store (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
            json: print JSON
        """
        if _url(url):
            data = _remote("GET", "/admin/policies" + ("?history=1" if history else ""), str(_url(url)), _key(api_key))
            version, rows = data["policy_version"], data["data"]
        else:
            store = _local()
            version, rows = store.version(), store.history() if history else list(store.current().values())
        if json:
            print(jsonlib.dumps({"policy_version": version, "data": rows}, indent=2))
            return
        print(f"policy_version {version}")
        for row in rows:
            print(f"v{row['version']}  {row['scope']}  {row['actor'] or '-'}  {jsonlib.dumps(row['document'])}")

    def policy_show(self, scope: str, url: str | None = None, api_key: str | None = None) -> None:
        """Print a scope's current document (JSON).

        Args:
            scope SCOPE: global, TENANT or TENANT:MODEL
            url URL: a running server instead of the local store (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
        """
        if _url(url):
            row = _remote("GET", f"/admin/policies/{scope}", str(_url(url)), _key(api_key))
        else:
            row = _local().current().get(scope)
            if row is None:
                raise InferFluxError(f"scope {scope!r} has no policy")
        print(jsonlib.dumps(row, indent=2))

    def policy_set(self, file: str, scope: str | None = None, url: str | None = None,
                   api_key: str | None = None) -> None:
        """Set a scope's policy from a JSON or YAML file: a new policy_version.

        Args:
            file FILE: `{scope: ..., document: {...}}`, or a bare document with --scope
            scope SCOPE: global, TENANT or TENANT:MODEL (overrides the file's)
            url URL: a running server instead of the local store (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
        """
        data = _read(file)
        document = data.get("document", data if "scope" not in data else {})
        target = scope or data.get("scope")
        if not target:
            raise InferFluxError(f"{file}: no scope (give --scope, or a `scope:` key in the file)")
        if _url(url):
            row = _remote("PUT", "/admin/policies", str(_url(url)), _key(api_key),
                          {"scope": target, "document": document})
        else:
            from inferflux.server.policy.document import check_scope, parse_document

            parsed = _api(lambda: parse_document(document))
            row = _local().put(_api(lambda: check_scope(str(target))), parsed.model_dump(exclude_defaults=True),
                               _user())
        print(f"policy of {row['scope']} is version {row['version']}")

    def policy_rollback(self, version: int, url: str | None = None, api_key: str | None = None) -> None:
        """Make an earlier version current again (written as a new version; history is kept).

        Args:
            version VERSION: the version to restore (`inferctl admin policy list --history`)
            url URL: a running server instead of the local store (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
        """
        if _url(url):
            row = _remote("POST", "/admin/policies/rollback", str(_url(url)), _key(api_key), {"version": version})
        else:
            store = _local()
            old = _api(lambda: store.get(version))
            row = store.put(old["scope"], old["document"], _user())
        print(f"policy of {row['scope']} is version {row['version']} (the document of version {version})")


def _api(call: Any) -> Any:
    """Run a store call; its 4xx (a bad document or scope, an unknown version) as a CLI error."""
    from inferflux.server.errors import APIError

    try:
        return call()
    except APIError as exc:
        raise InferFluxError(exc.message) from None


def _user() -> str:
    try:
        return "local:" + getpass.getuser()
    except (KeyError, OSError):
        return f"local:{os.getuid()}"
