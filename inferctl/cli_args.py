"""The command line read against each command's signature: flags checked before anything runs, and the help.

`inferctl` commands are the methods of `InferCtl` (`inferctl/cli.py`) and their flags are the
methods' parameters, as they were under `fire`. This module replaced fire's parsing because:

- fire evaluates every value as a Python literal, so `--prompt "hello, world"` arrived as the
  tuple `('hello', 'world')` and a model named `1e3` as the float 1000.0;
- fire cannot refuse an unknown flag before the command runs: `serve --max-model-len 2048` was
  ignored, and on other commands the leftover was reported after the command had run;
- its help went to stderr through a pager-style formatter, with underscores (`--served_model_name`)
  and without flags it did not know about (`--set`).

The rules: a parameter without a default is a positional argument (and so is any parameter the
command lists in `positional`); every parameter is also a `--flag` (dashes or underscores); a `bool`
flag takes no value (`--json`, `--no-json`, or `--json=false`); other flags take one (`--port 8080`
or `--port=8080`), converted by the parameter's annotation; `--` ends the flags. Each parameter is
described in the method's docstring under `Args:` as `name METAVAR: text`, which is what `--help` shows.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any


class UsageError(Exception):
    """The command line does not match the command: an unknown flag, a missing argument, a bad value."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a command, as the command line sees it."""

    name: str  # the Python name (served_model_name)
    kind: type  # str, int, float or bool (Optional[...] unwrapped)
    required: bool
    default: Any
    positional: bool
    metavar: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Extra:
    """A flag a command takes that is not a parameter of its method (`--set`, which may repeat)."""

    flag: str
    metavar: str
    help: str


@dataclasses.dataclass(frozen=True)
class Command:
    """A command: its name as typed, the method behind it, and what its docstring says."""

    name: str
    method: Callable[..., Any]
    params: tuple[Param, ...]
    summary: str
    description: str
    extras: tuple[Extra, ...] = ()
    optional_positional: tuple[str, ...] = ()  # optional parameters also taken without their flag, in order

    @classmethod
    def of(cls, name: str, method: Callable[..., Any], positional: Sequence[str] = (),
           extras: Sequence[Extra] = ()) -> Command:
        """Read `method`'s signature and docstring; `positional` names optional parameters that may also
        be given without their flag (`inferctl run demo "Hi"`), in that order after the required ones."""
        summary, description, docs = _parse_doc(inspect.getdoc(method) or "")
        hints = typing.get_type_hints(method)
        params = []
        for p in inspect.signature(method).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            required = p.default is inspect.Parameter.empty
            metavar, text = docs.get(p.name, ("", ""))
            kind = _scalar(hints.get(p.name, str))
            params.append(Param(p.name, kind, required, None if required else p.default,
                                required or p.name in positional, metavar or p.name.upper(), text))
        missing = set(positional) - {p.name for p in params}
        if missing:
            raise TypeError(f"{name}: positional names unknown parameters {sorted(missing)}")
        return cls(name, method, tuple(params), summary, description, tuple(extras), tuple(positional))

    def flags(self) -> list[str]:
        return [p.flag for p in self.params] + [e.flag for e in self.extras]

    def slots(self) -> list[Param]:
        """The parameters positional arguments fill, in order: the required ones, then the optional ones."""
        by_name = {p.name: p for p in self.params}
        return [p for p in self.params if p.required] + [by_name[n] for n in self.optional_positional]


def _scalar(hint: Any) -> type:
    """`str | None` -> str; the CLI only converts to str, int, float and bool."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    return hint if hint in (str, int, float, bool) else str


_ARG_LINE = re.compile(r"^(\w+)(?:\s+(\S+?))?:(?:\s+(.*))?$")


def _parse_doc(doc: str) -> tuple[str, str, dict[str, tuple[str, str]]]:
    """(first line, the text before `Args:`, {name: (metavar, help)}) of a Google-style docstring."""
    lines = doc.splitlines()
    summary = lines[0].strip() if lines else ""
    body, args, current = [], {}, None
    in_args = False
    for line in lines[1:]:
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            body.append(line)
            continue
        stripped = line.strip()
        match = _ARG_LINE.match(stripped) if line.startswith("    ") and not line.startswith("      ") else None
        if match:
            current = match[1]
            args[current] = (match[2] or "", match[3] or "")
        elif stripped and current:
            metavar, text = args[current]
            args[current] = (metavar, f"{text} {stripped}")
    return summary, "\n".join(body).strip(), args


# --- parsing ---


def parse(command: Command, argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """`argv` (after the command name) as keyword arguments for the method, plus the extra flags' values.

    Raises UsageError, before anything runs, for an unknown flag (naming the closest known one),
    a flag without its value, a value of the wrong type, a missing or an unexpected argument.
    """
    by_flag: dict[str, Param] = {}
    for p in command.params:
        by_flag[p.flag] = p
        by_flag["--" + p.name] = p
    extras = {e.flag: e for e in command.extras}
    values: dict[str, Any] = {}
    extra_values: dict[str, list[str]] = {e.flag: [] for e in command.extras}
    positional: list[str] = []
    i, args = 0, list(argv)
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            positional += args[i:]
            break
        if not arg.startswith("-") or arg == "-" or _is_number(arg):
            positional.append(arg)
            continue
        flag, has_value, inline = arg.partition("=")
        if flag in extras:
            if not has_value:
                inline, i = _value_after(args, i, flag, extras[flag].metavar, by_flag, extras)
            extra_values[flag].append(inline)
            continue
        negated = flag.startswith("--no-") and by_flag.get("--" + flag[5:]) is not None
        param = by_flag.get("--" + flag[5:]) if negated else by_flag.get(flag)
        if param is None or (negated and param.kind is not bool):
            raise UsageError(unknown_flag_message(command, flag))
        if param.name in values:
            raise UsageError(f"{command.name}: {param.flag} is given twice")
        if param.kind is bool:
            if negated and has_value:
                raise UsageError(f"{command.name}: {flag} takes no value")
            values[param.name] = (not negated) if not has_value else _convert(command, param, inline)
            continue
        if not has_value:
            inline, i = _value_after(args, i, param.flag, param.metavar, by_flag, extras)
        values[param.name] = _convert(command, param, inline)
    slots = [p for p in command.slots() if p.name not in values]
    if len(positional) > len(slots):
        extra = positional[len(slots)]
        raise UsageError(f"{command.name}: unexpected argument {extra!r} (usage: {usage_line(command)})")
    for param, text in zip(slots, positional):
        values[param.name] = _convert(command, param, text)
    missing = [p for p in command.params if p.required and p.name not in values]
    if missing:
        raise UsageError(f"{command.name}: missing {', '.join(p.metavar for p in missing)} "
                         f"(usage: {usage_line(command)})")
    return values, extra_values


def _is_number(text: str) -> bool:
    """`-5` or `-0.5` is a value (a negative number), not a flag."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _value_after(args: list[str], i: int, flag: str, metavar: str, by_flag: dict[str, Param],
                 extras: dict[str, Extra]) -> tuple[str, int]:
    """The argument after a flag that takes a value; an error if there is none or it is another flag."""
    if i >= len(args):
        raise UsageError(f"{flag} needs a value ({flag} {metavar})")
    value = args[i]
    if value.partition("=")[0] in by_flag or value.partition("=")[0] in extras or value in ("-h", "--help"):
        raise UsageError(f"{flag} needs a value ({flag} {metavar}), got the flag {value}")
    return value, i + 1


def _convert(command: Command, param: Param, text: str) -> Any:
    where = param.flag if not param.positional else param.metavar
    if param.kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{command.name}: {where} is true or false, got {text!r}")
    if param.kind in (int, float):
        try:
            return param.kind(text)
        except ValueError:
            noun = "a whole number" if param.kind is int else "a number"
            raise UsageError(f"{command.name}: {where} must be {noun}, got {text!r}") from None
    return text


def unknown_flag_message(command: Command, flag: str, config_keys: Iterable[str] | None = None) -> str:
    """`unknown flag --max-model-len for serve; did you mean --set runtime.max_model_len=VALUE?` and the like.

    A flag that names a config key (vLLM's `--max-model-len`, `--port`-style habits) is pointed at
    `--set` on the commands that take it; otherwise the closest of the command's own flags is named.
    """
    text = f"{command.name}: unknown flag {flag}"
    tail = f" (`inferctl {command.name} --help` lists the flags)"
    guess = difflib.get_close_matches(flag.replace("_", "-"), command.flags(), n=1, cutoff=0.6)
    if any(e.flag == "--set" for e in command.extras):
        by_name = {key.rpartition(".")[2]: key for key in (config_keys if config_keys is not None
                                                           else _config_keys())}
        wanted = flag.lstrip("-").replace("-", "_")
        near = difflib.get_close_matches(wanted, list(by_name), n=1, cutoff=0.8)
        key = by_name.get(wanted) or (by_name[near[0]] if near and not guess else None)
        if key:
            return f"{text}; did you mean --set {key}=VALUE?{tail}"
    if guess:
        return f"{text}; did you mean {guess[0]}?{tail}"
    return text + tail


def _config_keys() -> list[str]:
    """Every `section.key` of the config, for `--set` suggestions."""
    from inferflux.config import Config

    keys = []
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(value)]
        else:
            keys.append(section.name)
    return keys


def closest(name: str, names: Iterable[str]) -> str | None:
    """The closest of `names` to a mistyped one, if any is close."""
    found = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return found[0] if found else None


# --- help ---


def usage_line(command: Command) -> str:
    slots = command.slots()
    parts = [f"inferctl {command.name}"] + [p.metavar if p.required else f"[{p.metavar}]" for p in slots]
    for p in command.params:
        if p not in slots:
            parts.append(f"[{p.flag}]" if p.kind is bool else f"[{p.flag} {p.metavar}]")
    parts += [f"[{e.flag} {e.metavar} ...]" for e in command.extras]
    return " ".join(parts)


def command_help(command: Command) -> str:
    """`inferctl COMMAND --help`: usage, what it does, then every argument and flag with its default."""
    slots = command.slots()
    rows = [(p.metavar, p.help + ("" if p.required else f" (optional; also {p.flag} {p.metavar})"))
            for p in slots]
    flag_rows: list[tuple[str, str]] = []
    for p in command.params:
        if p in slots:
            continue
        left = p.flag if p.kind is bool else f"{p.flag} {p.metavar}"
        text = p.help
        if p.kind is not bool and p.default is not None and "default" not in text:
            text = f"{text} (default {p.default})" if text else f"default {p.default}"
        flag_rows.append((left, text))
    flag_rows += [(f"{e.flag} {e.metavar}", e.help) for e in command.extras]
    flag_rows.append(("-h, --help", "show this help"))
    width = min(30, max(len(left) for left, _ in rows + flag_rows))
    out = [f"usage: {usage_line(command)}", "", command.summary]
    if command.description:
        out += ["", command.description]
    if rows:
        out += ["", "arguments:"] + [_row(left, text, width) for left, text in rows]
    out += ["", "flags:"] + [_row(left, text, width) for left, text in flag_rows]
    return "\n".join(out)


def _row(left: str, text: str, width: int) -> str:
    if len(left) > width:
        return f"  {left}\n  {'':<{width}}  {text}".rstrip()
    return f"  {left:<{width}}  {text}".rstrip()


def main_help(commands: Sequence[Command], about: str, extra_rows: Sequence[tuple[str, str]] = ()) -> str:
    """`inferctl --help` (and bare `inferctl`): every command with its one-line summary."""
    rows = [(c.name, c.summary) for c in commands] + list(extra_rows)
    width = max(len(name) for name, _ in rows)
    return "\n".join([
        "usage: inferctl COMMAND [ARGUMENTS] [FLAGS]", "", about, "", "commands:",
        *(_row(name, summary, width) for name, summary in rows), "",
        "flags:", _row("-h, --help", "show this help", width), _row("--version", "print the version", width), "",
        "`inferctl COMMAND --help` (or `inferctl help COMMAND`) shows a command's arguments and flags.",
    ])
