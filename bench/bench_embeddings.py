"""Embeddings per second of 128-token texts at batch 32: the engine (MLX) against
sentence-transformers on torch's CPU build, the same model (all-MiniLM-L6-v2), measured
side by side in one run (alternating rounds; each side's best round counts). Prints the
machine's load average before and after (the 2 cores are shared: both sides slow down
under load, the ratio moves less).

    pip install torch==2.13.0 && pip install -e ".[bench]"
    python bench/bench_embeddings.py [--texts 512] [--rounds 3]
"""

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402  (the BLAS first)
from engine import DEFAULT_EMBEDDING_MODEL, EngineConfig, PoolingEngine, resolve_model  # noqa: E402
from tiny_text import texts_of_tokens  # noqa: E402

TOKENS, BATCH = 128, 32


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        print(f"bench_embeddings: skipped, the anchor needs torch and sentence-transformers ({e}); "
              "pip install torch==2.13.0 && pip install -e '.[bench]'")
        return 0
    ours = PoolingEngine.load(DEFAULT_EMBEDDING_MODEL, EngineConfig(progress=False, embed_batch=BATCH))
    texts = texts_of_tokens(ours.tokenizer.tok, args.texts, TOKENS)
    assert {len(e.ids) for e in ours.tokenizer.texts(texts)} == {TOKENS}
    theirs = SentenceTransformer(str(resolve_model(DEFAULT_EMBEDDING_MODEL)), device="cpu")
    load_before = os.getloadavg()
    ours.embed(texts[:BATCH])
    theirs.encode(texts[:BATCH], batch_size=BATCH)  # warm-up both
    best = {"kernelext (MLX)": float("inf"), "sentence-transformers (torch CPU)": float("inf")}
    for _ in range(args.rounds):
        for name, run in (("kernelext (MLX)", lambda: ours.embed(texts, progress=False)),
                          ("sentence-transformers (torch CPU)",
                           lambda: theirs.encode(texts, batch_size=BATCH, convert_to_numpy=True))):
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"{args.texts} texts of {TOKENS} tokens, batch {BATCH}, best of {args.rounds} alternating rounds "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads; MLX backend {ours.backend}, "
          f"weights {ours.core.runner.dtype}; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after)")
    for name, seconds in best.items():
        print(f"  {name:<36} {args.texts / seconds:8.1f} embeddings/s")
    anchor = best["sentence-transformers (torch CPU)"]
    print(f"  ratio kernelext / sentence-transformers: {anchor / best['kernelext (MLX)']:.2f}x (target >= 1.5x)")
    ours.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
