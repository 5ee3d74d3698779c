"""Who may call the server, and what they may do: API keys, tenants and RBAC scopes (docs/security.md).

- `keys.py`: tenants and keys in `$INFERFLUX_HOME/state.db` (SHA-256 of each key, never the key).
- `keys_redis.py`: the same in Redis (`state.backend: redis`), shared by replicas; `open_key_store` picks.
- `crypto.py`, `secrets_store.py`: secrets encrypted at rest under the master key (AES-256-GCM, `secrets` table).
- `scopes.py`: the one route -> scope table.
- `auth.py`: the check every request passes when `security.auth` is `required`.
- `admin.py`: `/admin/tenants`, `/admin/keys`.
- `check_exposure`: the rule that a server without auth listens on loopback only.

Nothing here imports JAX, so `inferctl serve` can refuse a bad bind before the model loads.
"""

from __future__ import annotations

import ipaddress
import socket

from inferflux.config import Config, ConfigError


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one (an empty host is every address: False)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_exposure(config: Config) -> None:
    """Refuse (one-line ConfigError) to serve without auth on an address other machines can reach."""
    security = config.security
    if security.auth == "required" or security.allow_unauthenticated or is_loopback(config.server.host):
        return
    raise ConfigError(f"refusing to listen on {config.server.host} with security.auth=off: anyone who reaches the "
                      "port could use the server. Set security.auth=required (and create keys with `inferctl "
                      "admin keys create`), bind 127.0.0.1, or set security.allow_unauthenticated=true")
