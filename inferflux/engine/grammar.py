"""Constrained decoding: a request's `Constraint` compiled once, one matcher per sample, one bitmask per step.

The engine is xgrammar (PyPI): it compiles JSON Schema, regular expressions and EBNF (llama.cpp's GBNF
syntax) to one grammar form, and its per-token mask was 10-200x cheaper than llguidance's and
outlines-core's on the same vocabularies (`benchmarks/bench_grammar.py`, figures in benchmarks/RESULTS.md).

How a constraint flows (docs/engine.md):

- `Constraint` is the one spec every request surface produces (server/structured.py maps the dialects).
- `GrammarCompiler.compile` turns it into a compiled grammar, cached per spec; a bad schema, regex or
  grammar raises `GrammarError` (a `SamplingParamsError`, so a 400) at submission.
- `Matcher` (one per sample) holds the grammar state and its packed int32 mask row `[ceil(V/32)]` for the
  next token; the engine thread advances it on each accepted token and refills every constrained row's
  mask in one batched call (`fill_masks`, xgrammar's thread pool, GIL released).
- The mask is an input of the compiled step (`SamplingTensors.allowed`, `[rows, ceil(V/32)]`): free rows
  are all ones, so constrained and free requests share a batch and nothing recompiles.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from inferflux.engine.sampling_params import SamplingParamsError
from inferflux.engine.tool_grammar import TOOL_FORMATS, tool_call_grammar

if TYPE_CHECKING:
    from inferflux.formats.tokenizer import Tokenizer

ConstraintKind = Literal["json", "regex", "choice", "grammar", "tool_call"]
_CACHE_SIZE = 64


class GrammarError(SamplingParamsError):
    """A schema, regex or grammar that cannot be compiled (the message names the problem)."""


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What the output must match. `value` is text so the spec is hashable (the compile-cache key):

    - json: a JSON Schema as JSON text; "" means any JSON value;
    - regex: a regular expression the whole output matches;
    - choice: a JSON list of strings, the output is exactly one of them;
    - grammar: EBNF in llama.cpp's GBNF syntax (`root ::= ...`);
    - tool_call: JSON `{"format": "hermes"|"qwen3_coder"|"mistral"|"llama3_json", "parallel": bool,
      "tools": [{"name", "parameters"}]}`: a call to one of the tools (one or more when `parallel`), its
      arguments valid against the tool's parameters, in the format's syntax (engine/tool_grammar.py).
    """

    kind: ConstraintKind
    value: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | None = None) -> Constraint:
        """Output valid against `schema` (None: any JSON object)."""
        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("a JSON schema must be an object")
        return cls("json", json.dumps(schema, sort_keys=True))

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        if not isinstance(pattern, str):
            raise GrammarError("a regex must be a string")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        if isinstance(options, str) or not options or not all(isinstance(o, str) for o in options):
            raise GrammarError("choice must be a non-empty list of strings")
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def grammar(cls, ebnf: str) -> Constraint:
        if not isinstance(ebnf, str) or not ebnf.strip():
            raise GrammarError("a grammar must be a non-empty string of EBNF (GBNF) rules")
        return cls("grammar", ebnf)

    @classmethod
    def tool_call(cls, tools: Sequence[dict[str, Any]], fmt: str = "hermes", parallel: bool = False) -> Constraint:
        """A call to one of `tools` (each `{"name", "parameters"}`) in the chat template's format; `parallel`:
        one or more calls (OpenAI's `parallel_tool_calls`), else exactly one."""
        if not tools:
            raise GrammarError("a tool call needs at least one tool")
        if fmt not in TOOL_FORMATS:
            raise GrammarError(f"unknown tool-call format {fmt!r} (one of {', '.join(TOOL_FORMATS)})")
        spec = [{"name": t["name"], "parameters": t.get("parameters") or {"type": "object"}} for t in tools]
        # keys in the client's order: the grammar writes parameters in the order the schema (and template) has
        return cls("tool_call", json.dumps({"format": fmt, "parallel": bool(parallel), "tools": spec}))


def _xgr() -> Any:
    import xgrammar  # imported on first use: it loads torch, which a server without constraints never needs

    return xgrammar


def _first_line(exc: BaseException) -> str:
    """xgrammar's messages start with a `[time] file.cc:line:` prefix; keep what names the problem."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """Each id's bytes as the grammar sees them; special tokens (EOS, chat markers) are empty, which
    xgrammar reads as "never text", so a grammar cannot be satisfied by emitting `<|im_end|>` inside a string."""
    special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    return [b"" if i in special else tokenizer.token_to_piece(i) for i in range(tokenizer.vocab_size)]


class GrammarCompiler:
    """Compiles `Constraint`s for one tokenizer and model vocabulary; thread-safe (the server validates on
    the event loop's threads, the engine thread builds matchers)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_threads: int = 2) -> None:
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)
        self._tokenizer = tokenizer
        self._max_threads = max_threads
        self._compiler: Any = None
        self._batch: Any = None
        self._cache: OrderedDict[Constraint, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._no_control: dict[bool, np.ndarray] = {}

    def _json_mask(self, newline: bool) -> np.ndarray:
        """Tokens holding a control byte (< 0x20; but a newline when `newline`, which the tool-call wrapper
        writes) cleared: compact JSON never contains one, but xgrammar 0.2.9's length-bounded string rule
        (`maxLength`) lets them into strings."""
        if newline not in self._no_control:
            bits = np.zeros(self.words * 32, bool)
            pieces = token_bytes(self._tokenizer)
            bits[:len(pieces)] = [not any(c < 0x20 and not (newline and c == 0x0A) for c in p) for p in pieces]
            packed = np.packbits(bits.reshape(-1, 32)[:, ::-1]).view(">u4").astype(np.uint32)
            self._no_control[newline] = packed.view(np.int32)
        return self._no_control[newline]

    def _ensure(self) -> Any:
        if self._compiler is None:
            xgr = _xgr()
            info = xgr.TokenizerInfo(token_bytes(self._tokenizer), xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                     stop_token_ids=sorted(self._tokenizer.eos_ids) or None)
            self._compiler = xgr.GrammarCompiler(info, max_threads=self._max_threads)
            self._batch = xgr.BatchGrammarMatcher(max_threads=self._max_threads)
        return self._compiler

    def compile(self, constraint: Constraint) -> Any:
        """The compiled grammar for `constraint` (cached); `GrammarError` naming the problem if it is invalid."""
        with self._lock:
            if constraint in self._cache:
                self._cache.move_to_end(constraint)
                return self._cache[constraint]
            compiler = self._ensure()
            try:
                compiled = self._compile(compiler, constraint)
            except GrammarError:
                raise
            except Exception as exc:  # xgrammar raises RuntimeError/ValueError with its parser's message
                raise GrammarError(f"invalid {_WHAT[constraint.kind]}: {_first_line(exc)}") from None
            self._cache[constraint] = compiled
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return compiled

    @staticmethod
    def _compile(compiler: Any, c: Constraint) -> Any:
        xgr = _xgr()
        if c.kind == "json":
            if not c.value:
                return compiler.compile_builtin_json_grammar()
            try:
                json.loads(c.value)
            except ValueError as exc:
                raise GrammarError(f"invalid JSON schema: {exc}") from None
            # Compact separators and no free whitespace: a document ends in as few tokens as possible, and a
            # model cannot stall by emitting whitespace forever.
            return compiler.compile_json_schema(c.value, any_whitespace=False, separators=(", ", ": "))
        if c.kind == "regex":
            return compiler.compile_regex(c.value)
        if c.kind == "choice":
            options = json.loads(c.value)
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(o) for o in options))
        if c.kind == "grammar":
            return compiler.compile_grammar(c.value)
        if c.kind == "tool_call":
            return compiler.compile_grammar(tool_call_grammar(xgr, c.value))
        raise GrammarError(f"unknown constraint kind {c.kind!r}")

    def matcher(self, constraint: Constraint, stop_ids: Iterable[int]) -> Matcher:
        """A fresh matcher at the grammar's start, its first mask filled."""
        m = Matcher(_xgr().GrammarMatcher(self.compile(constraint), override_stop_tokens=sorted(stop_ids) or None),
                    self.words, frozenset(stop_ids))
        if constraint.kind in ("json", "tool_call"):
            keep = self._json_mask(newline=constraint.kind == "tool_call").copy()
            for t in stop_ids:  # stop tokens are special (empty) pieces, never text: keep them allowed
                if t < self.vocab_size:
                    keep.view(np.uint32)[t // 32] |= np.uint32(1 << (t % 32))
            m.keep = keep
        self.fill_masks([m])
        return m

    def fill_masks(self, matchers: Sequence[Matcher]) -> None:
        """Refill each matcher's mask row for its next token: one batched call over all of them."""
        if not matchers:
            return
        self._ensure()
        out = np.empty((len(matchers), self.words), np.int32)
        self._batch.batch_fill_next_token_bitmask([m.raw for m in matchers], out)
        for m, row in zip(matchers, out):
            m.mask = row if m.keep is None else row & m.keep


_WHAT = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
         "tool_call": "tool parameters schema"}


class Matcher:
    """One sample's grammar state and its mask for the next token (packed int32 bits, bit i of word i // 32)."""

    def __init__(self, raw: Any, words: int, stop_ids: frozenset[int]) -> None:
        self.raw = raw
        self.mask = np.full(words, -1, np.int32)
        self.stop_ids = stop_ids
        self.failed = False
        self.keep: np.ndarray | None = None  # ANDed into every mask (JSON: no control-byte tokens)

    def accept(self, token_id: int) -> bool:
        """Advance on a sampled token; False (and `failed`) if the grammar does not allow it."""
        if not self.failed and not self.raw.is_terminated() and not self.raw.accept_token(int(token_id)):
            self.failed = True
        return not self.failed

    @property
    def done(self) -> bool:
        """The output is complete: a stop token was accepted, or only stop tokens may follow (the grammar is
        in an accepting state with no continuation), so the sample should end now with `stop`."""
        if self.failed or self.raw.is_terminated():
            return True
        if not self.raw.is_completed():
            return False
        rest = self.mask.view(np.uint32).copy()
        for t in self.stop_ids:
            if t // 32 < len(rest):
                rest[t // 32] &= np.uint32(~(1 << (t % 32)) & 0xFFFFFFFF)
        return not rest.any()


def all_allowed(rows: int, words: int) -> np.ndarray:
    """The mask of free rows: every bit set."""
    return np.full((rows, words), -1, np.int32)
