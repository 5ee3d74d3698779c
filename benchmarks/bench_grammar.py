"""Per-token mask cost of the grammar engines on PyPI, on real and synthetic vocabularies.

    python -m benchmarks.bench_grammar                       # every engine, every vocab, batch 1 and 32
    python -m benchmarks.bench_grammar --engines llguidance --vocabs synthetic-128k --batch 1,32
    python -m benchmarks.bench_grammar --decode --batch 1,16      # engine decode tokens/s, free vs schema

Why: structured output computes one vocabulary bitmask per constrained row per step on the engine thread;
that time adds to every decode step, so the engine was chosen by it (docs/engine.md, benchmarks/RESULTS.md).

What is measured: `batch` matchers for one JSON Schema (nested objects, arrays with bounds, enums, bounded
numbers, an optional field) each walk the token ids of one valid document; per step every matcher fills its
row of a packed int32 `[batch, ceil(V/32)]` bitmask and then consumes its next token. Reported: compile time
(schema -> grammar, once per request) and the mean microseconds per step for the whole batch (mask + advance).

Vocabularies: the test fixtures' trained tokenizers (~1k ids, byte-level BPE and SentencePiece) and a synthetic
byte-level vocabulary of 32k or 128k entries (the 256 bytes, then words, word pieces with and without a
leading space, digit runs and punctuation runs) -- no download; mask cost depends on vocabulary size and on
how tokens share prefixes, not on merges. Documents are tokenized by greedy longest match over the vocabulary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import string
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
                 "minItems": 1, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "nickname": {"type": "string"},
    },
    "required": ["name", "age", "tags", "address", "score"],
}
DOCUMENT = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["red", "blue"],
                       "address": {"city": "London", "zip": "W1 4AB"}, "score": 0.75}, separators=(",", ":"))


# ---------------------------------------------------------------------------- vocabularies


def synthetic_vocab(size: int, seed: int = 0) -> list[bytes]:
    """`size` distinct byte strings shaped like a byte-level BPE vocabulary (see the module doc)."""
    rng = random.Random(seed)
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    seen = set(vocab)
    words = [w.encode() for w in ("Ada Lovelace London blue red green name age tags address city zip score "
                                  "nickname the of and to in is for on that with as it").split()]
    letters = string.ascii_lowercase
    pools = [
        lambda: "".join(rng.choice(letters) for _ in range(rng.randint(2, 9))).encode(),
        lambda: (" " + "".join(rng.choice(letters) for _ in range(rng.randint(1, 9)))).encode(),
        lambda: ("".join(rng.choice(letters) for _ in range(rng.randint(2, 7)))).capitalize().encode(),
        lambda: "".join(rng.choice(string.digits) for _ in range(rng.randint(1, 3))).encode(),
        lambda: "".join(rng.choice('{}[]":,. _-') for _ in range(rng.randint(2, 4))).encode(),
    ]
    for w in words + [b" " + w for w in words] + [b'"' + w + b'"' for w in words]:
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    weights = [5, 6, 2, 1, 1]
    while len(vocab) < size:
        tok = rng.choices(pools, weights)[0]()
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)
    return vocab[:size]


def greedy_encode(vocab: Sequence[bytes], text: bytes) -> list[int]:
    """Longest-match tokenization (enough to drive a matcher through a valid document)."""
    index = {tok: i for i, tok in enumerate(vocab) if tok}
    longest = max(len(t) for t in index)
    out, i = [], 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            tid = index.get(text[i:i + n])
            if tid is not None:
                out.append(tid)
                i += n
                break
        else:
            raise ValueError(f"byte {text[i]} is not in the vocabulary")
    return out


def fixture_vocabs() -> dict[str, tuple[list[bytes], int]]:
    """The test fixtures' tokenizers as (token bytes, eos id)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from inferflux.formats.tokenizer import Tokenizer
    from tests.fixtures import tokenizers as fx

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        makers = (("fixture-llama3-bpe", fx.make_llama3_bpe_tokenizer), ("fixture-spm", fx.make_spm_tokenizer))
        for name, make in makers:
            tok = Tokenizer.from_hf_dir(make(Path(tmp) / name))
            out[name] = ([tok.token_to_piece(i) for i in range(tok.vocab_size)], int(tok.eos_id or 0))
    return out


# ---------------------------------------------------------------------------- engines
# Each returns (compile seconds, make_matchers(n) -> list of opaque matchers, step(matchers, tokens, mask)).


def _llguidance(vocab: list[bytes], eos: int):
    import llguidance as llg
    import llguidance.numpy as llnp

    class _Tok:
        eos_token_id, bos_token_id, tokens, special_token_ids = eos, None, vocab, [eos]

        def __call__(self, s: bytes) -> list[int]:
            return greedy_encode(vocab, s)

    tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_Tok()))
    t0 = time.perf_counter()
    grammar = llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    err = llg.LLMatcher.validate_grammar(grammar, tokenizer)
    assert not err, err
    compile_s = time.perf_counter() - t0
    executor = llg.LLExecutor()

    def make(n: int) -> list:
        return [llg.LLMatcher(tokenizer, grammar) for _ in range(n)]

    def step(matchers: list, tokens: Sequence[int], mask: np.ndarray) -> None:
        if len(matchers) == 1:
            llnp.fill_next_token_bitmask(matchers[0], mask, 0)
        else:
            llnp.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
        for m, t in zip(matchers, tokens):
            ok = m.consume_token(t)
            assert ok, m.get_error()

    return compile_s, make, step


def _xgrammar(vocab: list[bytes], eos: int):
    import xgrammar as xgr

    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - t0
    batch = xgr.BatchGrammarMatcher()

    def make(n: int) -> list:
        return [xgr.GrammarMatcher(compiled) for _ in range(n)]

    def step(matchers: list, tokens: Sequence[int], mask: np.ndarray) -> None:
        import torch
        tmask = torch.from_numpy(mask)
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(tmask, 0)
        else:
            batch.batch_fill_next_token_bitmask(matchers, tmask)
        for m, t in zip(matchers, tokens):
            ok = m.accept_token(t)
            assert ok

    return compile_s, make, step


def _outlines_core(vocab: list[bytes], eos: int):
    import outlines_core as oc

    mapping: dict[bytes, list[int]] = {}
    for i, tok in enumerate(vocab):
        if i != eos:
            mapping.setdefault(tok, []).append(i)
    t0 = time.perf_counter()
    regex = oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index = oc.Index(regex, oc.Vocabulary(eos, mapping))
    compile_s = time.perf_counter() - t0

    def make(n: int) -> list:
        return [oc.Guide(index) for _ in range(n)]

    def step(matchers: list, tokens: Sequence[int], mask: np.ndarray) -> None:
        for i, (g, t) in enumerate(zip(matchers, tokens)):
            row = mask[i]
            g.write_mask_into(row.ctypes.data, row.size, row.itemsize)
            g.advance(t)

    return compile_s, make, step


ENGINES: dict[str, Callable] = {"llguidance": _llguidance, "xgrammar": _xgrammar, "outlines-core": _outlines_core}


def run(engine: str, vocab: list[bytes], eos: int, batches: Sequence[int]) -> dict:
    compile_s, make, step = ENGINES[engine](vocab, eos)
    doc = greedy_encode(vocab, DOCUMENT.encode())
    result = {"engine": engine, "vocab": len(vocab), "doc_tokens": len(doc), "compile_ms": round(compile_s * 1e3, 1)}
    for b in batches:
        mask = np.zeros((b, (len(vocab) + 31) // 32), np.int32)
        matchers = make(b)
        t0 = time.perf_counter()
        for tok in doc:
            step(matchers, [tok] * b, mask)
        result[f"us_per_step_b{b}"] = round((time.perf_counter() - t0) / len(doc) * 1e6, 1)
    return result


def decode(batch: int, max_tokens: int) -> None:
    """Decode tokens/s of the tiny test model (LLM API, whole engine loop) with and without a JSON schema."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from inferflux import LLM, Constraint, SamplingParams
    from tests.fixtures import tokenizers as fx
    from tests.fixtures.models import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model("llama", Path(tmp) / "m", fx.make_llama3_bpe_tokenizer(Path(tmp) / "tok"))
        llm = LLM(model, page_size=16, max_num_seqs=batch, max_num_batched_tokens=max(64, batch),
                  max_model_len=512, num_pages=400)
        for name, constraint in (("free", None), ("schema", Constraint.json_schema(SCHEMA))) * 3:
            params = SamplingParams(n=batch, seed=1, max_tokens=max_tokens, ignore_eos=constraint is None,
                                    constraint=constraint)
            t0 = time.perf_counter()
            out = llm.generate("JSON:", params)[0]
            elapsed = time.perf_counter() - t0
            tokens = sum(len(c.token_ids) for c in out.outputs)
            print(json.dumps({"decode": name, "batch": batch, "tokens": tokens,
                              "tokens_per_s": round(tokens / elapsed, 1)}), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--vocabs", default="fixture-llama3-bpe,fixture-spm,synthetic-32k,synthetic-128k")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--decode", action="store_true", help="decode tokens/s of the tiny model, free vs schema")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    if args.decode:
        for b in batches:
            decode(b, 64)
        return
    wanted = args.vocabs.split(",")
    vocabs: dict[str, tuple[list[bytes], int]] = {}
    if any(v.startswith("fixture") for v in wanted):
        vocabs.update({k: v for k, v in fixture_vocabs().items() if k in wanted})
    for v in wanted:
        if v.startswith("synthetic-"):
            size = int(v.split("-")[1].rstrip("k")) * 1024
            voc = synthetic_vocab(size)
            voc[-1] = b"<|eot|>"
            vocabs[v] = (voc, size - 1)
    for (vname, (vocab, eos)), engine in itertools.product(vocabs.items(), args.engines.split(",")):
        try:
            print(json.dumps({"vocab_name": vname, **run(engine, vocab, eos, batches)}), flush=True)
        except Exception as exc:  # one engine's failure should not hide the others' figures
            print(json.dumps({"vocab_name": vname, "engine": engine, "error": f"{type(exc).__name__}: {exc}"}))


if __name__ == "__main__":
    main()
