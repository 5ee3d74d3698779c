"""The local pages: `/debug` (KV pages, queues, token traces) and `/admin` (keys, tenants, limits, policies).

`install` registers them on an app: `/debug` with `server.debug_ui: true` or `security.auth:
required` (admin scope); the `/admin` page wherever the `/admin/*` JSON routes are served. Pages and
assets are public; the data behind them needs the admin key (docs/observability.md).
"""

from __future__ import annotations

from typing import Any

from quart import Quart


def install(app: Quart, config: Any) -> None:
    from inferflux.server.ui import debug, pages, traces

    auth_required = config.security.auth == "required"
    served = False
    if config.server.debug_ui or auth_required:
        app.register_blueprint(debug.bp)
        app.extensions[traces.ENABLED] = True
        served = True
    if config.server.admin_enabled or auth_required:
        app.register_blueprint(pages.admin_page_bp)
        served = True
    if served:
        app.register_blueprint(pages.assets_bp)
