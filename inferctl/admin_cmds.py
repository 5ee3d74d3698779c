"""`inferctl admin tenants|keys ...`: tenants and API keys, on the local `$INFERFLUX_HOME` or on a server.

Without `--url` the commands open `$INFERFLUX_HOME/state.db` directly (SQLite in WAL mode, so a
running server sees a revocation at its next request); with `--url` (or INFERFLUX_URL) they call
the server's `/admin/*` routes with an `admin`-scoped key (`--api-key` or INFERFLUX_API_KEY).
Each sub-command is a method of `Admin`, parsed like every other command (`cli_args.py`).
"""

from __future__ import annotations

import json as jsonlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from inferctl.cli_args import Command, UsageError, closest, command_help, parse
from inferctl.limits_cmds import LIMIT_VERBS, LimitsAdmin
from inferctl.policy_cmds import POLICY_VERBS, PolicyAdmin
from inferctl.secrets_cmds import SECRET_VERBS, SecretsAdmin
from inferflux.errors import InferFluxError

if TYPE_CHECKING:
    from inferflux.server.access.audit_chain import Verdict


class _Local:
    """The key store of this machine's `$INFERFLUX_HOME`."""

    def __init__(self) -> None:
        from inferflux.config import load_config
        from inferflux.server.access.keys_redis import open_key_store

        self.store = open_key_store(load_config())  # state.db, or Redis with state.backend: redis

    def call(self, action: str, **args: Any) -> Any:
        from inferflux.server.access.keys import parse_duration

        s = self.store
        if action == "tenants.create":
            return s.create_tenant(args["name"])
        if action == "tenants.list":
            return s.tenants()
        if action == "tenants.delete":
            s.delete_tenant(args["name"])
            return {"name": args["name"], "deleted": True}
        if action == "keys.create":
            expires = parse_duration(args["expires"]) if args.get("expires") else None
            secret, record = s.create_key(args["tenant"], args["scopes"], expires, args.get("name") or "")
            return {**record.public(), "key": secret}
        if action == "keys.list":
            return [k.public() for k in s.keys(args.get("tenant"))]
        if action == "keys.revoke":
            return s.revoke(args["key_id"]).public()
        raise AssertionError(action)


class _Remote:
    """A server's `/admin/*` routes."""

    def __init__(self, url: str, api_key: str | None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0)

    def call(self, action: str, **args: Any) -> Any:
        routes = {"tenants.create": ("POST", "/admin/tenants", {"name": args.get("name")}),
                  "tenants.list": ("GET", "/admin/tenants", None),
                  "tenants.delete": ("DELETE", f"/admin/tenants/{args.get('name')}", None),
                  "keys.create": ("POST", "/admin/keys", {k: v for k, v in args.items() if v is not None}),
                  "keys.list": ("GET", "/admin/keys", None),
                  "keys.revoke": ("POST", f"/admin/keys/{args.get('key_id')}/revoke", None),
                  "audit.tail": ("GET", "/admin/audit", None),
                  "audit.verify": ("GET", "/admin/audit/verify", None)}
        method, path, body = routes[action]
        params: dict[str, Any] | None = None
        if action in ("keys.list", "audit.tail") and args.get("tenant"):
            params = {"tenant": args["tenant"]}
        if action == "audit.tail":
            params = {**(params or {}), "limit": str(args["limit"])}
        response = self.http.request(method, path, json=body, params=params)
        data = response.json() if response.content else {}
        if response.status_code >= 400:
            error = data.get("error") if isinstance(data, dict) else None
            message = error.get("message") if isinstance(error, dict) else error
            raise InferFluxError(f"{self.http.base_url}{path}: {response.status_code} {message or response.text}")
        return data.get("data", data) if isinstance(data, dict) and data.get("object") == "list" else data


def _backend(url: str | None, api_key: str | None) -> _Local | _Remote:
    url = url or os.environ.get("INFERFLUX_URL")
    if url:
        return _Remote(url, api_key or os.environ.get("INFERFLUX_API_KEY"))
    return _Local()


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


class Admin(SecretsAdmin, LimitsAdmin, PolicyAdmin):
    """Tenants and API keys: `inferctl admin tenants create|list|delete`, `inferctl admin keys create|list|revoke`."""

    def tenants_create(self, name: str, url: str | None = None, api_key: str | None = None) -> None:
        """Create a tenant (the owner of API keys).

        Args:
            name NAME: letters, digits, '.', '_' or '-'
            url URL: a running server instead of the local $INFERFLUX_HOME (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
        """
        tenant = _backend(url, api_key).call("tenants.create", name=name)
        print(f"created tenant {tenant['name']}")

    def tenants_list(self, url: str | None = None, api_key: str | None = None, json: bool = False) -> None:  # noqa: A002
        """List the tenants and how many keys each has.

        Args:
            url URL: a running server instead of the local $INFERFLUX_HOME (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
            json: print JSON
        """
        tenants = _backend(url, api_key).call("tenants.list")
        if json:
            print(jsonlib.dumps(tenants, indent=2))
            return
        _table([[t["name"], str(t["keys"]), _when(t["created"])] for t in tenants], ["TENANT", "KEYS", "CREATED"])

    def tenants_delete(self, name: str, url: str | None = None, api_key: str | None = None) -> None:
        """Delete a tenant and all its keys (they stop working at the next request).

        Args:
            name NAME: the tenant
            url URL: a running server instead of the local $INFERFLUX_HOME (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
        """
        _backend(url, api_key).call("tenants.delete", name=name)
        print(f"deleted tenant {name}")

    def keys_create(self, tenant: str, scopes: str, expires: str | None = None, name: str | None = None,
                    url: str | None = None, api_key: str | None = None, json: bool = False) -> None:  # noqa: A002
        """Create an API key; it is printed once and cannot be shown again.

        Args:
            tenant TENANT: the tenant the key belongs to
            scopes LIST: comma-separated: inference, embeddings, models:read, models:write, admin
            expires DURATION: expire after this long, e.g. 30d, 12h, 2w (default: never)
            name TEXT: a label for lists
            url URL: a running server instead of the local $INFERFLUX_HOME (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
            json: print the record (with the key) as JSON
        """
        if not scopes.strip():
            raise UsageError("admin keys create: --scopes needs at least one scope")
        created = _backend(url, api_key).call("keys.create", tenant=tenant, scopes=scopes, expires=expires,
                                              name=name)
        if json:
            print(jsonlib.dumps(created, indent=2))
            return
        print(f"created key {created['id']} for tenant {created['tenant']} "
              f"(scopes {','.join(created['scopes'])}; expires {_when(created['expires'])})", file=sys.stderr)
        print("store it now: it is not shown again", file=sys.stderr)
        print(created["key"])

    def keys_list(self, tenant: str | None = None, url: str | None = None, api_key: str | None = None,
                  json: bool = False) -> None:  # noqa: A002
        """List API keys (ids, scopes, expiry, revocation, last use; never the keys themselves).

        Args:
            tenant TENANT: only this tenant's keys
            url URL: a running server instead of the local $INFERFLUX_HOME (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
            json: print JSON
        """
        keys = _backend(url, api_key).call("keys.list", tenant=tenant)
        if json:
            print(jsonlib.dumps(keys, indent=2))
            return
        rows = [[k["id"], k["tenant"], ",".join(k["scopes"]),
                 "revoked" if k["revoked"] else "active" if k["active"] else "expired",
                 _when(k["expires"]), _when(k["last_used"]), k["name"]] for k in keys]
        _table(rows, ["KEY ID", "TENANT", "SCOPES", "STATE", "EXPIRES", "LAST USED", "NAME"])

    def keys_revoke(self, key_id: str, url: str | None = None, api_key: str | None = None) -> None:
        """Revoke an API key: requests with it get 401 from now on.

        Args:
            key_id KEYID: the key's id (`inferctl admin keys list`), e.g. key_0123456789ab
            url URL: a running server instead of the local $INFERFLUX_HOME (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
        """
        _backend(url, api_key).call("keys.revoke", key_id=key_id)
        print(f"revoked {key_id}")

    def audit_verify(self, dir: str | None = None, url: str | None = None,  # noqa: A002
                     api_key: str | None = None) -> None:
        """Check the audit log's hash chain; exits 1 naming the first bad file:line and why.

        Args:
            dir DIR: the audit directory (default $INFERFLUX_HOME/audit), e.g. a copy shipped off the machine
            url URL: verify a running server's own log through GET /admin/audit/verify (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
        """
        from inferflux.server.access.audit_chain import verify

        if dir is None and (url or os.environ.get("INFERFLUX_URL")):
            verdict = _remote_verdict(_backend(url, api_key).call("audit.verify"))
            if not verdict.ok:
                raise InferFluxError(verdict.summary())
            print(verdict.summary())
            return
        directory = _audit_dir(dir)
        if not os.path.isdir(directory):
            raise InferFluxError(f"no audit log at {directory} (audit.enabled writes it there)")
        verdict = verify(directory)
        if not verdict.ok:
            raise InferFluxError(verdict.summary())
        print(verdict.summary())

    def audit_tail(self, n: int = 20, tenant: str | None = None, dir: str | None = None,  # noqa: A002
                   json: bool = False, url: str | None = None, api_key: str | None = None) -> None:  # noqa: A002
        """Print the last audit records, oldest first.

        Args:
            n N: how many records (also -n N; default 20)
            tenant TENANT: only this tenant's records
            dir DIR: the audit directory (default $INFERFLUX_HOME/audit)
            json: print each record as its JSON line
            url URL: read a running server's log through GET /admin/audit instead (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
        """
        from inferflux.server.access.audit_chain import tail

        if dir is None and (url or os.environ.get("INFERFLUX_URL")):
            records = _backend(url, api_key).call("audit.tail", limit=max(1, n), tenant=tenant)
        else:
            records = tail(_audit_dir(dir), max(0, n), tenant)
        if json:
            for record in records:
                print(jsonlib.dumps(record, sort_keys=True))
            return
        rows = [[str(r.get("time", "")), str(r.get("tenant") or "-"), str(r.get("key_id") or "-"),
                 str(r.get("method", "")), str(r.get("route", "")), str(r.get("model") or "-"),
                 str(r.get("status", "")), f"{r.get('prompt_tokens', 0)}+{r.get('completion_tokens', 0)}",
                 str(r.get("request_id") or "-")] for r in records]
        _table(rows, ["TIME", "TENANT", "KEY ID", "METHOD", "ROUTE", "MODEL", "STATUS", "TOKENS", "REQUEST"])


def _remote_verdict(answer: dict[str, Any]) -> Verdict:
    """GET /admin/audit/verify's answer as the local check's `Verdict`, so both forms print the same line."""
    from inferflux.server.access.audit_chain import GENESIS, Problem, Verdict

    def problem(found: dict[str, Any] | None) -> Problem | None:
        return None if not found else Problem(str(found["file"]), int(found["line"]), str(found["reason"]))

    return Verdict(records=int(answer["records"]), files=int(answer["files"]),
                   last_hash=str(answer.get("last_hash") or GENESIS), torn=problem(answer.get("torn")),
                   problem=problem(answer.get("first_bad")))


def _audit_dir(directory: str | None) -> str:
    if directory:
        return directory
    from inferflux.config import load_config
    from inferflux.server.access.audit_log import audit_directory

    return str(audit_directory(load_config()))


COMMANDS = [Command.of(f"admin {group} {verb}", getattr(Admin, f"{group}_{verb}"))
            for group, verbs in (("tenants", ("create", "list", "delete")), ("keys", ("create", "list", "revoke")))
            for verb in verbs]
COMMANDS += [Command.of(f"admin audit {verb}", getattr(Admin, f"audit_{verb}")) for verb in ("verify", "tail")]
COMMANDS += [Command.of(f"admin secrets {verb}", getattr(Admin, f"secrets_{verb}")) for verb in SECRET_VERBS]
COMMANDS.append(Command.of("admin rotate-master-key", Admin.rotate_master_key))
COMMANDS += [Command.of(f"admin limits {verb}", getattr(Admin, f"limits_{verb}")) for verb in LIMIT_VERBS]
COMMANDS += [Command.of(f"admin policy {verb}", getattr(Admin, f"policy_{verb}")) for verb in POLICY_VERBS]
_BY_NAME = {c.name: c for c in COMMANDS}


def usage() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = [f"  inferctl {c.name:<{width}}  {c.summary}" for c in COMMANDS]
    return "\n".join(["usage: inferctl admin tenants|keys|audit VERB [ARGUMENTS] [FLAGS]", "", Admin.__doc__ or "", "",
                      *lines, "", "`inferctl admin keys create --help` shows a command's flags."])


def dispatch(argv: list[str]) -> int:
    """`inferctl admin GROUP VERB ...`."""
    single = bool(argv) and f"admin {argv[0]}" in _BY_NAME  # a one-word command: rotate-master-key
    words = argv[:1] if single else [a for a in argv[:2] if not a.startswith("-")]
    if len(words) < 2 and not single:
        if not argv or argv[0] in ("-h", "--help"):
            print(usage())
            return 0
        raise UsageError(f"admin: expected `tenants|keys VERB`, e.g. `inferctl admin keys list`\n{usage()}")
    name = "admin " + " ".join(words)
    command = _BY_NAME.get(name)
    if command is None:
        guess = closest(name, _BY_NAME)
        raise UsageError(f"unknown command {name!r}" + (f"; did you mean {guess}?" if guess else "")
                         + " (`inferctl admin --help` lists them)")
    rest = argv[len(words):]
    if "-h" in rest or "--help" in rest:
        print(command_help(command))
        return 0
    if name == "admin audit tail":
        rest = ["--n" if arg == "-n" else arg for arg in rest]  # `tail -n 5`, as tail(1) takes it
    values, _ = parse(command, rest)
    run = getattr(Admin(), command.method.__name__)
    if words[0] == "audit" or values.get("url") or os.environ.get("INFERFLUX_URL"):
        run(**values)  # reading the log is not recorded in it; a server records what --url asks of it
        return 0
    from inferflux.server.access.audit_log import audited_cli

    with audited_cli(name, values):  # a local admin action: one line in the audit log
        run(**values)
    return 0
