"""Writes tests/fixtures/all-minilm-l6-v2-reference.json: sentence-transformers'
vectors for fixed texts with all-MiniLM-L6-v2 (the default embedding model), which
tests/test_embeddings.py compares the engine's vectors against (cosine >= 1 - 1e-3).

Needs torch and sentence-transformers, which the engine does not depend on:
    pip install torch==2.13.0 && pip install -e ".[bench]"
    python bench/make_embedding_reference.py
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402  (the BLAS first)
from engine import DEFAULT_EMBEDDING_MODEL, resolve_model  # noqa: E402

TEXTS = [
    "The cat sits on the mat.",
    "A feline is resting on a rug.",
    "Quarterly revenue grew by twelve percent.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Continuous batching lets many requests share one forward pass.",
    "Hi",
    "Überall in der Stadt blühen die Kirschbäume. 桜が咲いています。",
    "Retrieval-augmented generation first embeds the corpus, then retrieves the nearest passages "
    "for a question, reranks them with a cross-encoder and finally asks a language model. " * 6,
]


def main() -> None:
    from sentence_transformers import SentenceTransformer
    import sentence_transformers
    import torch

    path = resolve_model(DEFAULT_EMBEDDING_MODEL)
    model = SentenceTransformer(str(path), device="cpu")
    vectors = model.encode(TEXTS, batch_size=4, convert_to_numpy=True)
    out = ROOT / "tests" / "fixtures" / f"{DEFAULT_EMBEDDING_MODEL}-reference.json"
    out.write_text(json.dumps({
        "model": DEFAULT_EMBEDDING_MODEL, "made_with": {
            "sentence_transformers": sentence_transformers.__version__, "torch": torch.__version__},
        "texts": TEXTS, "vectors": [[round(float(x), 7) for x in v] for v in vectors]}) + "\n")
    print(f"wrote {out}: {len(TEXTS)} vectors of {vectors.shape[1]}")


if __name__ == "__main__":
    main()
