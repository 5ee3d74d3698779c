"""Compiled step programs kept whole on disk (engine/executable_cache.py): a second process with the same
$INFERFLUX_HOME loads every program it needs instead of tracing, lowering and compiling it, and generates the
same tokens; a damaged file is dropped and compiled again; with `max_compiled_programs: 1` (every step evicts)
loaded and compiled programs mix and the tokens stay the same (this once broke: a program JAX loaded from its
own cache was stored again, and that copy fails on XLA:CPU; executable_cache.py); `runtime.cache_executables:
false` stores nothing.
Separate processes, because the point is a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from inferflux import LLM, SamplingParams
llm = LLM(sys.argv[1], page_size=8, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, num_pages=32,
          cache_executables=sys.argv[2] == "on", max_compiled_programs=int(sys.argv[3]))
params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
out = llm.generate([[5, 17, 42, 99, 7], [3, 150]], params)
if sys.argv[3] == "1":  # more shapes, one at a time: every step evicts, and loaded and compiled programs mix
    # (Only programs first compiled in this process are stored; one XLA compiled from its own cache is not,
    # so the shapes the first run had compile again here. The 16-token prefill is new and comes back twice.)
    out += [llm.generate([p], params)[0] for p in ([5, 17, 42, 99, 7], [7] * 12, [3, 150], list(range(1, 30)),
                                                  [9] * 10)]
stored = llm.runner._stored
print("RESULT " + json.dumps({"loaded": stored.loaded, "compiled": stored.compiled,
                              "ids": [o.outputs[0].token_ids for o in out]}))
"""

# A warm start's warm-up with runtime.warmup_background (engine/warmup.py): the smallest token bucket's
# programs (and any not stored) are built before it returns, the other stored ones on a background thread;
# a request meanwhile loads what it needs itself, and the tokens are the same.
BACKGROUND = """
import json, sys, threading
from inferflux import LLM, SamplingParams
llm = LLM(sys.argv[1], page_size=8, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, num_pages=32,
          cache_executables=True)
runner = llm.runner
everything = runner.all_buckets()
stored = [b for b in everything if runner.is_stored(b)]
now = runner.warmup(background=True)
params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
out = llm.generate([[5, 17, 42, 99, 7], [3, 150]], params)  # while the rest may still be loading
for thread in threading.enumerate():
    if thread.name == "inferflux-warmup":
        thread.join()
print("RESULT " + json.dumps({"now": now, "all": len(everything), "stored": len(stored),
                              "smallest": sum(b[0] == min(x[0] for x in everything) for b in everything),
                              "built": len(runner.compiled_buckets), "compiled": runner._stored.compiled,
                              "ids": [o.outputs[0].token_ids for o in out]}))
"""


def run(model: Path, home: Path, mode: str = "on", cap: int = 100, script: str = SCRIPT) -> dict:
    env = {**os.environ, "INFERFLUX_HOME": str(home), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script, str(model), mode, str(cap)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_second_process_loads_every_program(tiny_model, tmp_path) -> None:
    model = tiny_model("llama")
    first = run(model, tmp_path)
    assert first["compiled"] >= 1 and first["loaded"] == 0, first
    files = sorted((tmp_path / "xla-cache").glob("code-*/executables/*.exe"))  # XLA's cache per code version
    assert len(files) == first["compiled"]
    second = run(model, tmp_path)
    assert second == {"loaded": first["compiled"], "compiled": 0, "ids": first["ids"]}, (first, second)

    files[0].write_bytes(files[0].read_bytes()[:100])  # a torn file: dropped, compiled and stored again
    third = run(model, tmp_path)
    assert (third["loaded"], third["compiled"], third["ids"]) == (first["compiled"] - 1, 1, first["ids"])
    # Compiled again from XLA's cache, which cannot be stored whole (executable_cache.py): the torn file is gone.
    assert not files[0].exists()

    bounded, fresh = run(model, tmp_path, cap=1), run(model, tmp_path / "fresh", "off", cap=1)
    assert bounded["loaded"] >= 2 and bounded["compiled"] >= 1, bounded  # both kinds, one at a time
    assert bounded["ids"] == fresh["ids"] and bounded["ids"][:2] == first["ids"]

    # Warm-up in the background on a warm home: first build everything (a cold warm-up stores all buckets).
    background = tmp_path / "background"
    cold = run(model, background, script=BACKGROUND)
    assert cold["stored"] == 0 and cold["now"] == cold["all"] == cold["built"], cold  # cold: all before ready
    warm = run(model, background, script=BACKGROUND)
    assert warm["stored"] == warm["all"] and warm["now"] == warm["smallest"] < warm["all"], warm
    assert warm["built"] == warm["all"] and warm["compiled"] == 0, warm  # the rest loaded, nothing compiled
    assert warm["ids"] == cold["ids"] == first["ids"]

    off = tmp_path / "off"
    assert run(model, off, "off")["ids"] == first["ids"]
    assert not list((off / "xla-cache").glob("**/executables"))
