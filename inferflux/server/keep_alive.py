"""Ollama's keep-alive values (how long a model stays loaded once idle) as seconds.

Used by every dialect that lets a request set it: Ollama's `keep_alive`, LM Studio's `ttl`.
"""

from __future__ import annotations

import math
import re
from typing import Any

FOREVER = math.inf
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_keep_alive(value: Any) -> float | None:
    """Seconds a model stays loaded once idle; None when not given, `FOREVER` for "never unload".

    Ollama's forms: a number of seconds, or a Go duration string ("5m", "1h30m", "250ms", "0");
    a plain number in a string ("300", "-1") is seconds too. Negative means forever.
    Raises ValueError for anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"keep_alive must be a duration like \"5m\" or a number of seconds, not {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _go_duration(text)
    else:
        seconds = float(value)
    if math.isnan(seconds):
        raise ValueError("keep_alive must be a number of seconds or a duration")
    return FOREVER if seconds < 0 or math.isinf(seconds) else seconds


def _go_duration(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in "+-" else text
    total, pos = 0.0, 0
    for match in _GO_PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match[1]) * _GO_UNITS[match[2]]
        pos = match.end()
    if not body or pos != len(body):
        raise ValueError(f"invalid keep_alive duration {text!r}: use e.g. \"5m\", \"1h30m\", \"30s\", 300, 0 or -1")
    return sign * total
