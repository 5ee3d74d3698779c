"""Reading the small JSON files that ride along with models (config, tokenizer config, shard index)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inferflux.errors import ModelFormatError


def read_json_object(path: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """The file's top-level object; `{}` for an absent file when `missing_ok`.

    A missing (when required), unreadable or non-object file is a `ModelFormatError` naming it.
    """
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(path, "file not found") from None
    except (OSError, ValueError) as err:
        raise ModelFormatError(path, f"cannot read JSON: {err}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(path, "expected a JSON object")
    return data
