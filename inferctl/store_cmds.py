"""`inferctl pull / list / show / rm / make-demo-model` over the model store.

Plain functions taking a `ModelStore`, so the CLI (`inferctl/cli.py`) can
wire them as thin methods and tests can call them directly. Output for people
goes to stdout; progress bars go to stderr, and only when stderr is a terminal,
so logs and pipes stay clean.
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inferflux.store import ModelEntry, ModelStore, Progress, StoreError


def pull(store: ModelStore, source: str, name: str | None = None, quantize: str | None = None) -> str:
    """Store SOURCE (GGUF file, safetensors folder, ollama://NAME:TAG, hf://ORG/REPO[/FILE]) and print its name."""
    from inferflux.config import load_config
    from inferflux.store.signing import verifier_from_config

    verifier = verifier_from_config(load_config())  # security.require_signed_models
    with _ProgressBars.for_stderr() as progress:
        stored = store.pull(str(source), name=None if name is None else str(name), quantize=quantize,
                            progress=progress, verifier=verifier)
    print(f"pulled {stored} ({_entry_summary(store, stored)})")
    return stored


def list_models(store: ModelStore) -> None:
    """Print a table of stored models: NAME, SIZE, FORMAT, QUANT, MODIFIED."""
    now = datetime.now(UTC)
    rows = [("NAME", "SIZE", "FORMAT", "QUANT", "MODIFIED")]
    rows += [(e.name, human_size(e.size), e.format, e.quantization or "-", relative_time(e.modified, now))
             for e in store.list()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def show(store: ModelStore, name: str, as_json: bool = False) -> None:
    """Describe a stored model, or a GGUF file / safetensors folder given by path."""
    from inferflux.formats.describe import describe_model

    path = Path(str(name)).expanduser()
    info = describe_model(path) if path.exists() else store.show(str(name))
    if as_json:
        print(json.dumps(info, indent=2, ensure_ascii=False, default=str))
        return
    rows = _show_rows(info)
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def rm(store: ModelStore, name: str) -> None:
    """Remove a stored model; blobs other names still use are kept."""
    freed = store.rm(str(name))
    print(f"deleted {store_name(name)}" + (f" (freed {human_size(freed)})" if freed else ""))


def make_demo(store: ModelStore, name: str = "demo", force: bool = False) -> str:
    """Build the random-weight demo model and store it as a safetensors folder under NAME.

    A stored model of that name is kept unless `force`: replacing someone's `demo` (or a real model
    they happened to call that) without asking would lose it.
    """
    from inferflux.convert.demo_model import make_demo_model

    target = store_name(name)
    if store.has(target) and not force:
        raise StoreError(f"{target} is already in the store; `inferctl make-demo-model --force` replaces it, "
                         f"--name NAME stores the demo under another name")
    with tempfile.TemporaryDirectory(prefix="inferflux-demo-") as tmp:
        folder = make_demo_model(Path(tmp) / "demo-model")
        with _ProgressBars.for_stderr() as progress:
            stored = store.pull(str(folder), name=target, progress=progress)
    print(f"pulled {stored} (random weights: it produces gibberish); try `inferctl serve {stored}`")
    return stored


def make_demo_folder(out: Path, force: bool = False) -> Path:
    """Write the demo model into folder `out`.

    A folder that holds anything but an earlier demo model is refused unless `force` (the demo's
    files would overwrite a real model's `config.json` and weights); rewriting an earlier demo is
    allowed, since it is rebuilt identically, so the README's first command can be run twice.
    """
    from inferflux.convert.demo_model import make_demo_model

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out} is a file; give --out a folder")
    if out.is_dir() and any(out.iterdir()) and not force and not _is_demo_folder(out):
        raise StoreError(f"{out} already holds files that are not a demo model; "
                         "choose another --out, or --force to write into it")
    path = make_demo_model(out)
    print(f"wrote {path} (random weights: it produces gibberish)")
    return path


def _is_demo_folder(folder: Path) -> bool:
    """An earlier `make-demo-model --out`: its config.json has the demo's exact shape."""
    from inferflux.convert.demo_model import SHAPE

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and all(config.get(key) == value for key, value in SHAPE.items())


def store_name(name: str) -> str:
    """`name` as the store lists it (`demo` -> `demo:latest`)."""
    from inferflux.store import parse_name

    return str(parse_name(str(name)))


def human_size(size: int) -> str:
    """Decimal units, as Ollama prints them: 4.7 GB, 512 MB, 33 KB."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 100 else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"  # unreachable; keeps type checkers content


def relative_time(when: datetime, now: datetime) -> str:
    """"just now", "5 minutes ago", "3 days ago", "2 months ago"."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = max(0.0, (now - when).total_seconds())
    if seconds < 60:
        return "just now"
    for unit, span in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                       ("hour", 3600), ("minute", 60)):
        if seconds >= span:
            count = int(seconds // span)
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "just now"


def _entry_summary(store: ModelStore, stored: str) -> str:
    entry = next((e for e in store.list() if e.name == stored), None)
    if entry is None:
        return "stored"
    return ", ".join(p for p in (human_size(entry.size), entry.format, entry.quantization) if p)


def _show_rows(info: dict[str, Any]) -> list[tuple[str, Any]]:
    """The `show` table; store fields only when the model came from the store."""
    rows: list[tuple[str, Any]] = []
    if "name" in info:
        rows.append(("name", info["name"]))
    rows += [("path", info.get("path")), ("format", info.get("format")),
             ("architecture", info.get("architecture") or "unknown")]
    if info.get("capabilities"):  # ModelFacts' words: completion, tools, embedding
        rows.append(("capabilities", ", ".join(info["capabilities"])))
    if info.get("parameters") is not None:
        rows.append(("parameters", f'{info.get("parameter_size")} ({info["parameters"]:,})'))
    if info.get("layers") is not None and "heads" in info:
        rows += [("context length", info.get("context_length")),
                 ("embedding length", info.get("embedding_length")),
                 ("layers / heads / kv heads", f'{info["layers"]} / {info["heads"]} / {info["kv_heads"]}'),
                 ("vocabulary", info.get("vocab_size"))]
    rows += [("quantization", info.get("quantization") or "unknown"),
             ("size", human_size(int(info.get("size_bytes") or 0)))]
    if "chat_template" in info:
        template = info["chat_template"]
        rows.append(("chat template", "none (plain-text fallback)" if not template else f"{len(template)} chars"))
        rows.append(("license", info.get("license") or "unknown"))
    if "name" in info:
        rows += [("source", info.get("source")), ("modified", info.get("modified")),
                 ("digest", str(info.get("digest", ""))[:12])]
    if info.get("note"):
        rows.append(("note", info["note"]))
    return rows


class _ProgressBars:
    """One tqdm bar per phase ("hashing x", "copying x", "converting to Q4_K") on stderr."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bar: Any = None
        self._label: str | None = None

    @classmethod
    def for_stderr(cls) -> _ProgressBars | _NoProgress:
        """Bars when stderr is a terminal and tqdm is installed; otherwise nothing is printed."""
        if not sys.stderr.isatty():
            return _NoProgress()
        try:
            return cls()
        except ImportError:
            return _NoProgress()

    def __call__(self, label: str, done: int, total: int, unit: str) -> None:
        if label != self._label:
            self._close_bar()
            self._label = label
            self._bar = self._tqdm(total=total, desc=label[:40], unit=unit, unit_scale=unit == "B",
                                   unit_divisor=1024, file=sys.stderr, leave=False, dynamic_ncols=True)
        self._bar.update(done - self._bar.n)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._label = None, None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_bar()


class _NoProgress:
    """The quiet stand-in: the store gets no callback at all."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


__all__ = [
    "ModelEntry",
    "human_size",
    "list_models",
    "make_demo",
    "make_demo_folder",
    "pull",
    "relative_time",
    "rm",
    "show",
    "store_name",
]
